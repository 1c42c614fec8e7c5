"""Errors: user exceptions cross as themselves with the remote traceback, failing
constructors fail run() promptly, unpicklable values are named, unknown targets are clear."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import serval as serve
from serval.exceptions import (
    ApplicationNotFoundError,
    DeploymentFailedError,
    RemoteTraceback,
    SerializationError,
)


class MyCustomError(Exception):
    pass


class CodedError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


class UnpicklableError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()

    def __reduce__(self):  # pickling it fails
        raise TypeError("cannot pickle UnpicklableError")


@serve.deployment
class Faulty:
    def raise_value_error(self, x: int) -> int:
        raise ValueError(f"bad input {x}")

    async def raise_async(self) -> None:
        await asyncio.sleep(0)
        raise KeyError("missing-key")

    def raise_custom(self) -> None:
        raise MyCustomError("custom failure")

    def raise_coded(self) -> None:
        raise CodedError("coded failure", 418)

    def raise_unpicklable(self) -> None:
        raise UnpicklableError("cannot travel")

    def ok(self, x: int = 1) -> int:
        return x

    def echo(self, *args, **kwargs):
        return args, kwargs

    def return_lock(self):
        return threading.Lock()


@serve.deployment
class BadInit:
    def __init__(self) -> None:
        raise RuntimeError("constructor exploded")

    def __call__(self) -> str:
        return "never"


@serve.deployment
class Wrapper:
    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, x: int) -> int:
        return await self.inner.raise_value_error.remote(x)


def test_user_exception_same_type_with_remote_traceback(apps: None) -> None:
    h = serve.run(Faulty.bind())
    with pytest.raises(ValueError, match="bad input 7") as info:
        h.raise_value_error.remote(7).result(timeout_s=10)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value_error" in str(cause)
    # the replica keeps serving
    assert h.ok.remote(3).result(timeout_s=10) == 3


def test_user_exception_from_async_method_and_await(apps: None) -> None:
    h = serve.run(Faulty.bind())

    async def main() -> None:
        await h.raise_async.remote()

    with pytest.raises(KeyError, match="missing-key") as info:
        asyncio.run(main())
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise_async" in str(info.value.__cause__)


def test_custom_exception_class(apps: None) -> None:
    h = serve.run(Faulty.bind())
    with pytest.raises(MyCustomError, match="custom failure") as info:
        h.raise_custom.remote().result(timeout_s=10)
    assert type(info.value) is MyCustomError
    assert "raise_custom" in str(info.value.__cause__)
    with pytest.raises(CodedError) as coded:
        h.raise_coded.remote().result(timeout_s=10)
    assert coded.value.code == 418


def test_exception_class_defined_inside_a_test(apps: None) -> None:
    class LocalError(Exception):
        pass

    @serve.deployment
    def fails(x: int) -> None:
        raise LocalError(f"local {x}")

    h = serve.run(fails.bind())
    with pytest.raises(LocalError, match="local 3"):
        h.remote(3).result(timeout_s=10)


def test_unpicklable_exception_becomes_user_code_error(apps: None) -> None:
    h = serve.run(Faulty.bind())
    with pytest.raises(serve.exceptions.UserCodeError) as info:
        h.raise_unpicklable.remote().result(timeout_s=10)
    text = str(info.value)
    assert "UnpicklableError" in text
    assert "cannot travel" in text
    assert "raise_unpicklable" in text
    assert h.ok.remote(2).result(timeout_s=10) == 2


def test_exception_through_composition(apps: None) -> None:
    h = serve.run(Wrapper.bind(Faulty.bind()))
    with pytest.raises(ValueError, match="bad input 5") as info:
        h.remote(5).result(timeout_s=10)
    assert "raise_value_error" in str(info.value.__cause__)


def test_exception_through_legacy_get(apps: None) -> None:
    serve.run(Faulty.bind())
    ref = Faulty.get_handle().raise_value_error.remote(9)
    with pytest.raises(ValueError, match="bad input 9") as info:
        serve.get(ref)
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_failing_constructor_fails_run_promptly(apps: None) -> None:
    start = time.monotonic()
    with pytest.raises(DeploymentFailedError) as info:
        serve.run(BadInit.bind())
    assert time.monotonic() - start < 15
    text = str(info.value)
    assert "constructor exploded" in text
    assert "RuntimeError" in text
    assert "__init__" in text  # the replica's traceback
    assert serve.status().applications["default"].status == "DEPLOY_FAILED"


def test_failing_constructor_in_a_graph(apps: None) -> None:
    start = time.monotonic()
    with pytest.raises(DeploymentFailedError, match="constructor exploded"):
        serve.run(Wrapper.bind(BadInit.bind()), name="graph", route_prefix="/graph")
    assert time.monotonic() - start < 15


def test_unpicklable_argument_is_named_and_replica_survives(apps: None) -> None:
    h = serve.run(Faulty.bind())
    with pytest.raises(SerializationError) as info:
        h.echo.remote(1, guard=threading.Lock()).result(timeout_s=10)
    text = str(info.value)
    assert "guard" in text
    assert "lock" in text.lower()
    with pytest.raises(SerializationError) as positional:
        h.echo.remote(1, threading.Lock()).result(timeout_s=10)
    assert "lock" in str(positional.value).lower()
    assert h.ok.remote(4).result(timeout_s=10) == 4
    assert h.echo.remote(1, k=2).result(timeout_s=10) == ((1,), {"k": 2})


def test_unpicklable_argument_async_path(apps: None) -> None:
    h = serve.run(Faulty.bind())

    async def main() -> int:
        with pytest.raises(SerializationError, match="guard"):
            await h.echo.remote(guard=threading.Lock())
        return await h.ok.remote(5)

    assert asyncio.run(main()) == 5


def test_unpicklable_argument_legacy_sync_handle(apps: None) -> None:
    serve.run(Faulty.bind())
    handle = Faulty.get_handle()
    start = time.monotonic()
    with pytest.raises(SerializationError, match="guard"):
        serve.get(handle.echo.remote(guard=threading.Lock()), timeout=10)
    assert time.monotonic() - start < 5
    assert serve.get(handle.ok.remote(8), timeout=10) == 8


def test_unpicklable_constructor_argument(cluster: None) -> None:
    with pytest.raises(TypeError, match="Faulty"):
        serve.run(Faulty.bind(threading.Lock()))


def test_failed_argument_fails_the_chained_call(apps: None) -> None:
    h = serve.run(Faulty.bind())
    failed = h.raise_value_error.remote(11)
    chained = h.echo.remote(failed)
    with pytest.raises(ValueError, match="bad input 11"):
        chained.result(timeout_s=10)
    assert h.ok.remote(1).result(timeout_s=10) == 1


def test_unpicklable_return_value(apps: None) -> None:
    h = serve.run(Faulty.bind())
    with pytest.raises(SerializationError) as info:
        h.return_lock.remote().result(timeout_s=10)
    assert "lock" in str(info.value).lower()
    assert h.ok.remote(6).result(timeout_s=10) == 6


def test_unknown_method(apps: None) -> None:
    h = serve.run(Faulty.bind())
    with pytest.raises(AttributeError, match="no_such_method"):
        h.no_such_method.remote().result(timeout_s=10)
    with pytest.raises(AttributeError):
        h.options(method_name="nope").remote().result(timeout_s=10)
    assert h.ok.remote(1).result(timeout_s=10) == 1


def test_unknown_application(cluster: None) -> None:
    with pytest.raises(ApplicationNotFoundError):
        serve.get_app_handle("nope")


def test_unknown_deployment(apps: None) -> None:
    serve.run(Faulty.bind())
    with pytest.raises(serve.exceptions.DeploymentNotFoundError):
        serve.get_deployment_handle("NoSuchDeployment", app_name="default")
    with pytest.raises(serve.exceptions.DeploymentNotFoundError):
        serve.get_deployment_handle("Faulty", app_name="no_such_app")


def test_errors_share_one_root() -> None:
    for cls in (
        serve.exceptions.BackPressureError,
        DeploymentFailedError,
        ApplicationNotFoundError,
        SerializationError,
        serve.exceptions.GetTimeoutError,
    ):
        assert issubclass(cls, serve.exceptions.RayServeException)
