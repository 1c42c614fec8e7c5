"""The HTTP proxy: serval's request cycle on uvicorn's connection (``http_protocol``), routing
by route prefix and the system routes (``app``), and the process's server: the listening
socket, the fd limit, uvicorn, and its control handler (``server``); beside uvicorn, when
``grpc_options`` name servicer functions, a ``grpc.aio`` server (``grpc``).

May import: ``wire``, ``caller`` (it calls ingress deployments through routers) and
``telemetry``.
"""
