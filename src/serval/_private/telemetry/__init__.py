"""Telemetry: the metrics registry of a process (``serve.metrics`` records into it), its
snapshot, the merge of several processes' snapshots and Prometheus's text format
(``metrics``); a proxy's request metrics (``ingress``) and access-log recorder
(``access_log``), both batched off the request path.

May import: nothing of serval's (it is a leaf every room may use).
"""
