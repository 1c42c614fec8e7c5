"""Telemetry: the metrics registry of a process (``serve.metrics`` records into it), its
snapshot, the merge of several processes' snapshots and Prometheus's text format.

May import: nothing of serval's (it is a leaf every room may use).
"""
