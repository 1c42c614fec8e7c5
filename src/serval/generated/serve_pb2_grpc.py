"""The client stub of Ray Serve's ``RayServeAPIService`` (``ray.serve.generated.
serve_pb2_grpc.RayServeAPIServiceStub``)::

    channel = grpc.insecure_channel("localhost:9000")
    stub = RayServeAPIServiceStub(channel)
    stub.ListApplications(ListApplicationsRequest()).application_names  # ["app1", ...]
    stub.Healthz(HealthzRequest()).message  # "success"
"""

from __future__ import annotations

from typing import Any

from serval.generated import serve_pb2

__all__ = ["RayServeAPIServiceStub"]

_SERVICE = "/ray.serve.RayServeAPIService/"


class RayServeAPIServiceStub:
    """Calls the proxy's health and list-applications methods over ``channel``."""

    def __init__(self, channel: Any) -> None:
        self.ListApplications = channel.unary_unary(
            _SERVICE + "ListApplications",
            request_serializer=serve_pb2.ListApplicationsRequest.SerializeToString,
            response_deserializer=serve_pb2.ListApplicationsResponse.FromString,
        )
        self.Healthz = channel.unary_unary(
            _SERVICE + "Healthz",
            request_serializer=serve_pb2.HealthzRequest.SerializeToString,
            response_deserializer=serve_pb2.HealthzResponse.FromString,
        )
