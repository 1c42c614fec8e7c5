"""Ray Serve's ``ray.serve.generated``, the part a gRPC client uses: the messages and the stub
of the proxies' own service, ``/ray.serve.RayServeAPIService/Healthz`` and
``ListApplications`` (see Ray Serve's gRPC guide, "Check proxy health"). Needs protobuf and
grpcio (``pip install serval[grpc]``); nothing else of serval imports this package.
"""
