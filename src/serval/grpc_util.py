"""gRPC helpers of Ray Serve's ``ray.serve.grpc_util``: the context a deployment's gRPC method
may take.

A method of an application's ingress deployment that declares a ``grpc_context`` parameter
gets a :class:`RayServegRPCContext` for each gRPC request: what the client sent (its
metadata, its peer) and what the response will carry. What the method sets on it (status
code, details, trailing metadata, compression) the proxy applies to the gRPC response::

    def __call__(self, request, grpc_context: RayServegRPCContext):
        grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        grpc_context.set_details("no such name")
        grpc_context.set_trailing_metadata([("num", "0")])
        return Response(...)

The context is a plain object that travels with the request to the replica and back with its
result; this module imports nothing of grpc's (status codes are grpc's own enum values, which
the user's code passes in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

__all__ = ["RayServegRPCContext"]

Metadata = list[tuple[str, Any]]


class RayServegRPCContext:
    """The ``grpc.ServicerContext`` methods a deployment can use, on a picklable object.

    Read: ``invocation_metadata()``, ``peer()``, ``auth_context()``, ``peer_identities()``,
    ``peer_identity_key()``, and what is set so far: ``code()``, ``details()``,
    ``trailing_metadata()``. Set: ``set_code``, ``set_details``, ``set_trailing_metadata``,
    ``set_compression``. serval's proxy adds ``request_id`` to the trailing metadata of every
    response, as Ray Serve's does.
    """

    def __init__(self, grpc_context: Any) -> None:
        """A snapshot of the server's ``grpc_context`` (a ``grpc.aio.ServicerContext``)."""
        self._invocation_metadata: Metadata = [
            (key, value) for key, value in grpc_context.invocation_metadata() or ()
        ]
        self._peer: str = grpc_context.peer()
        self._auth_context: dict[str, Any] = dict(grpc_context.auth_context() or {})
        self._peer_identities: Any = grpc_context.peer_identities()
        self._peer_identity_key: str | None = grpc_context.peer_identity_key()
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing_metadata: Metadata = []
        self._compression: grpc.Compression | None = None

    # -- what the client sent ------------------------------------------------------------------

    def invocation_metadata(self) -> Metadata:
        """The metadata the client sent, as (key, value) pairs."""
        return list(self._invocation_metadata)

    def peer(self) -> str:
        """The client's address as gRPC names it (``ipv4:127.0.0.1:53422``)."""
        return self._peer

    def auth_context(self) -> dict[str, Any]:
        """The call's auth properties (name -> iterable of bytes); empty on an insecure port."""
        return self._auth_context

    def peer_identities(self) -> Any:
        """The client's identities, or None when the call is not authenticated."""
        return self._peer_identities

    def peer_identity_key(self) -> str | None:
        """The auth property naming the client's identity, or None."""
        return self._peer_identity_key

    # -- what the response carries ---------------------------------------------------------------

    def code(self) -> grpc.StatusCode | None:
        """The status code set so far (None: the proxy decides, OK when the method returns)."""
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status code of the response (a ``grpc.StatusCode``)."""
        self._code = code

    def details(self) -> str | None:
        """The details string set so far."""
        return self._details

    def set_details(self, details: str) -> None:
        """The details string of the response (sent with its status)."""
        self._details = details

    def trailing_metadata(self) -> Metadata:
        """The trailing metadata set so far."""
        return list(self._trailing_metadata)

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        """The trailing metadata of the response; a later call replaces an earlier one."""
        self._trailing_metadata = list(trailing_metadata)

    def set_compression(self, compression: grpc.Compression) -> None:
        """The compression of the whole response (``grpc.Compression.Gzip``, ...). A
        server-streaming method's context reaches the proxy after its items: there it
        applies only when the stream sent none (grpc refuses a change once messages went)."""
        self._compression = compression

    def compression(self) -> grpc.Compression | None:
        """The compression set so far (serval's; grpc's context has no getter for it)."""
        return self._compression

    def __repr__(self) -> str:
        return f"RayServegRPCContext(peer={self._peer!r}, code={self._code!r})"
