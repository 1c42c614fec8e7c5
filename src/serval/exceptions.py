"""The errors serval raises, one tree rooted at :class:`ServalError`.

User exceptions are not wrapped: an exception raised in a replica reaches the caller as the same
type, with the remote traceback attached as its ``__cause__`` (a :class:`RemoteTraceback`).
Only an exception that cannot cross a process boundary becomes a :class:`UserCodeError`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApplicationNotFoundError",
    "BackPressureError",
    "DeploymentFailedError",
    "DeploymentNotFoundError",
    "DeploymentUnavailableError",
    "GetTimeoutError",
    "RayServeException",
    "RemoteTraceback",
    "ReplicaDiedError",
    "RequestCancelledError",
    "SerializationError",
    "ServalError",
    "UserCodeError",
    "gRPCStatusError",
]


class ServalError(Exception):
    """Base class of every error serval itself raises."""


# Ray Serve's name for the same root, so `except serve.exceptions.RayServeException` keeps working.
RayServeException = ServalError


class BackPressureError(ServalError):
    """The caller-side queue of a deployment is full (``max_queued_requests``)."""

    def __init__(self, deployment: str, num_queued: int, max_queued: int) -> None:
        super().__init__(
            f"request dropped by deployment {deployment!r}: {num_queued} requests are queued, "
            f"the limit (max_queued_requests) is {max_queued}"
        )
        self.deployment = deployment
        self.num_queued = num_queued
        self.max_queued = max_queued

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.deployment, self.num_queued, self.max_queued))


class RequestCancelledError(ServalError):
    """The request was cancelled before it produced a result."""


class DeploymentUnavailableError(ServalError):
    """The deployment has been deleted or has no way to serve the request."""


class DeploymentFailedError(ServalError):
    """A deployment could not start (its constructor raised, or its replica died starting)."""


class ApplicationNotFoundError(ServalError, KeyError):
    """No application of that name is running."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DeploymentNotFoundError(ServalError, KeyError):
    """No deployment of that name is running."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class GetTimeoutError(ServalError, TimeoutError):
    """``get``/``result`` did not finish within its timeout."""


class SerializationError(ServalError, TypeError):
    """A value could not be pickled or unpickled; the message names the value."""


class ReplicaDiedError(ServalError):
    """The replica serving this request died before answering."""


class gRPCStatusError(ServalError):
    """A gRPC method raised after setting a status code on its ``grpc_context``: the proxy
    answers with that code (and the details set, else the exception's message) rather than
    INTERNAL. Ray Serve's name; raised in the replica, seen by the proxy."""

    def __init__(
        self, original_exception: BaseException, code: Any = None, details: str | None = None
    ) -> None:
        super().__init__(details or str(original_exception))
        self.original_exception = original_exception
        self.grpc_code = code  # a grpc.StatusCode
        self.grpc_details = details

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.original_exception, self.grpc_code, self.grpc_details))


class UserCodeError(ServalError):
    """An exception from user code that could not be sent back as itself.

    Carries the original type name, message and the remote traceback.
    """

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}\n\nRemote traceback:\n{traceback}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.message, self.traceback))


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of a user exception; its text is the replica's traceback."""

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return f"\n\nRemote traceback (most recent call last, in the replica):\n{self.traceback}"
