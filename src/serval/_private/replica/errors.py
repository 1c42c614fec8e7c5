"""A failed call's answer, whatever the exception's methods do.

User code can make an exception's ``__str__``, ``__repr__`` or ``__reduce__`` raise anything,
or make it unpicklable. ``payloads`` gives the answers to try, best first: the exception
itself with its type name, message and traceback (when it survives a pickle round trip); the
same without the exception; and a plain message that reporting it failed. The replica sends
the first that pickles: every request ends in an answer.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator

import cloudpickle

from serval._private.wire import protocol
from serval._private.wire.messages import ErrorPayload

__all__ = ["payloads"]

logger = logging.getLogger(__name__)


def payloads(exc: BaseException, rid: int) -> Iterator[ErrorPayload]:
    """The answers to try for ``exc``, the failure of request ``rid``, best first."""
    reason = type(exc).__qualname__
    try:
        type_name, message, tb = protocol.describe_error(exc)
        payload = ErrorPayload(exc if _round_trips(exc) else None, type_name, message, tb)
    except BaseException as failure:
        logger.error("could not describe the error of request %s", rid, exc_info=failure)
        reason += f" (describing it raised {type(failure).__name__})"
    else:
        yield payload
        if payload.exc is not None:
            yield payload._replace(exc=None)
    yield ErrorPayload(None, "ServalError", f"the replica could not report an error: {reason}", "")


def _round_trips(exc: BaseException) -> bool:
    try:
        pickle.loads(cloudpickle.dumps(exc))
    except BaseException:  # user code decides what its __reduce__ raises
        return False
    return True
