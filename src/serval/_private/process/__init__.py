"""serval's processes: the entry point of every one (``worker``), the owner of a local cluster
and its controller restarts (``cluster``), the detached owner of ``serval start``
(``daemon``), the lifeline that ends a cluster with its owner (``lifeline``), the runtime
directory (``rundir``), what ``/proc`` says (``procs``), and settings read once
(``settings``).

May import: every room (it assembles them). ``backends`` may import its leaf modules
``procs`` and ``settings``.
"""
