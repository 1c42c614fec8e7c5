"""Backends: where replicas (and the proxy) run, how callers reach them, how their end is
learned. ``base`` is the interface and the choice by name; ``local`` runs OS processes on this
machine.

May import: ``wire``, and ``process``'s leaf modules (``procs``, ``settings``) for the local
backend's processes.
"""
