"""The messages of Ray Serve's ``RayServeAPIService``, as its ``serve.proto`` declares them::

    message ListApplicationsRequest {}
    message ListApplicationsResponse { repeated string application_names = 1; }
    message HealthzRequest {}
    message HealthzResponse { string message = 1; }

Built from a descriptor at import (no generated code to keep in step with a protobuf
version), in a descriptor pool of its own: the full names are Ray's (``ray.serve.*``), so a
process that imports Ray's own ``serve_pb2`` too has no clash in the default pool.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "DESCRIPTOR",
    "HealthzRequest",
    "HealthzResponse",
    "ListApplicationsRequest",
    "ListApplicationsResponse",
]

_PACKAGE = "ray.serve"
_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="serval/generated/serve.proto", package=_PACKAGE, syntax="proto3"
    )
    proto.message_type.add(name="ListApplicationsRequest")
    listed = proto.message_type.add(name="ListApplicationsResponse")
    listed.field.add(name="application_names", number=1, type=_STRING, label=_REPEATED)
    proto.message_type.add(name="HealthzRequest")
    health = proto.message_type.add(name="HealthzResponse")
    health.field.add(name="message", number=1, type=_STRING, label=_OPTIONAL)
    service = proto.service.add(name="RayServeAPIService")
    service.method.add(
        name="ListApplications",
        input_type=f".{_PACKAGE}.ListApplicationsRequest",
        output_type=f".{_PACKAGE}.ListApplicationsResponse",
    )
    service.method.add(
        name="Healthz",
        input_type=f".{_PACKAGE}.HealthzRequest",
        output_type=f".{_PACKAGE}.HealthzResponse",
    )
    return proto


_pool = descriptor_pool.DescriptorPool()
DESCRIPTOR = _pool.Add(_file())


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))


ListApplicationsRequest = _message("ListApplicationsRequest")
ListApplicationsResponse = _message("ListApplicationsResponse")
HealthzRequest = _message("HealthzRequest")
HealthzResponse = _message("HealthzResponse")
