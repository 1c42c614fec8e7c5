"""The controller: desired state and its reconciliation against running replicas
(``controller``), its records (``state``), the autoscaling decision (``autoscaling``, pure),
and the checkpoint a restarted controller recovers from (``checkpoint``).

May import: ``wire``, ``backends.base`` (the interface, never a backend) and ``telemetry``.
"""
