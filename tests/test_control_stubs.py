"""The typed stubs of the control calls (``wire/control.py``) match the handlers that serve
them: every ``rpc_<name>`` of the controller and of a replica has a stub method ``<name>``
with the same parameters and return type, and no stub calls a method that does not exist."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from serval._private.controller.controller import Controller
from serval._private.proxy.server import ProxyControl
from serval._private.replica.server import Replica
from serval._private.wire.control import ControllerCalls, ProxyCalls, ReplicaCalls


def _handler_methods(cls: type) -> dict[str, Any]:
    return {
        name.removeprefix("rpc_"): fn
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if name.startswith("rpc_")
    }


def _stub_methods(cls: type) -> dict[str, Any]:
    return {
        name: fn
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def _shape(fn: Any, skip: tuple[str, ...]) -> tuple[list[tuple[str, str, Any]], str]:
    """(parameters as (name, annotation, default), return annotation), annotations compared by
    their last dotted part (``metrics.Snapshot`` is ``Snapshot``)."""
    sig = inspect.signature(fn)

    def short(annotation: Any) -> str:
        text = annotation if isinstance(annotation, str) else repr(annotation)
        return text.replace("metrics.", "").replace(" | None", "|None")

    params = [
        (p.name, short(p.annotation), p.default)
        for p in sig.parameters.values()
        if p.name not in skip
    ]
    return params, short(sig.return_annotation)


@pytest.mark.parametrize(
    ("stub", "handler"),
    [(ControllerCalls, Controller), (ReplicaCalls, Replica), (ProxyCalls, ProxyControl)],
)
def test_every_control_call_has_a_matching_stub(stub: type, handler: type) -> None:
    stubs, handlers = _stub_methods(stub), _handler_methods(handler)
    assert sorted(stubs) == sorted(handlers)
    for name, fn in stubs.items():
        assert inspect.iscoroutinefunction(fn), name
        stub_params, stub_returns = _shape(fn, ("self",))
        handler_params, handler_returns = _shape(handlers[name], ("self", "peer"))
        # ``peer`` may be None where the handler also calls it itself (reconfigure)
        assert stub_params == handler_params, name
        assert stub_returns == handler_returns, name
