"""serval's internals, in rooms by role. Nothing here is public: the façade is ``serval``.

========== ======================================================== =========================
room       what lives there                                         may import (of serval's)
========== ======================================================== =========================
wire       frames, connections, control calls, the typed messages,  telemetry (a leaf)
           the shared types and the runtime directory's layout
telemetry  the metrics registry, its snapshot, merge and rendering; nothing
           log files: where, what a line holds, a process's setup
caller     the handle side: calls, routers, the cluster client,     wire
           process-wide state, control calls made from code
replica    the replica runtime: the server, sync runner, HTTP in    wire, caller, telemetry
           the replica, request context, streams' flow control
proxy      the HTTP and gRPC proxy: request cycles, routing,        wire, caller, telemetry
           the server
controller desired state, reconciliation, autoscaling, checkpoint   wire, backends.base,
                                                                    telemetry
dashboard  the dashboard process: the live page and its history,    wire, caller, telemetry
           Ray Serve's REST API, the token and Host/Origin guard
backends   where replicas run: the interface and its backends       wire, telemetry,
                                                                    process.procs,
                                                                    process.settings
process    entry points, the owner and its lifeline, the daemon,    everything
           the runtime directory, /proc, settings
========== ======================================================== =========================

Every room may also import the public leaves ``serval.exceptions``, ``serval.config``,
``serval.status``, ``serval.grpc_util`` and ``serval.logging_config``.
``tests/test_layout.py`` checks these rules, and that no module imports another in a cycle.
"""
