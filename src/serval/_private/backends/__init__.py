"""Backends: where replicas run and how callers reach them."""
