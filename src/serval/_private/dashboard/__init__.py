"""The dashboard: a Starlette app served by uvicorn in a process of its own
(``serval::dashboard``), started by the cluster's owner (``process/dashboard.py``).

``server`` (the process's body: the listening socket it inherits, uvicorn, the sampler),
``app`` (the routes: the page and its static files, the live events, Ray Serve's REST API),
``guard`` (every request: its Host and Origin must be the dashboard's own, and it must carry
the token — query, cookie or ``Authorization: Bearer``), ``history`` (the controller sampled
about once a second: a ring buffer of rates, error rates, latency percentiles and in-flight
counts per deployment, from the deltas of counters and histogram buckets), ``shapes`` (Ray
Serve's ``ServeInstanceDetails`` JSON from the controller's details), ``deploy`` (the REST
API's PUT: ``serval deploy`` run in a subprocess, so that this process never imports user
code), ``logs`` (replicas' recent log lines, read from their files).

May import: ``wire``, ``caller`` (the controller's client) and ``telemetry``.
"""
