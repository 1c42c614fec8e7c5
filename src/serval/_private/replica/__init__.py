"""The replica runtime: the server that runs one user object (``server``), the worker threads
of its sync methods (``sync_runner``), HTTP and websockets inside a replica (``http``), what
user code can ask about its request (``request_context``), and the flow control of its
streamed output (``outflow``).

May import: ``wire``, ``caller`` (a replica calls other deployments through handles),
``telemetry`` and ``serval.ingress``.
"""
