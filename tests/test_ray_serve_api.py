"""Ray Serve's documented behaviour, where serval differed (issue 13), tried the way Ray Serve's
guides write it: HTTP to a method or function that takes no argument, and
``starlette.requests.Request`` found after a bare ``import starlette``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from typing import Any

import httpx
import pydantic
import pytest

import serval as serve
from serval.handle import RayServeDeploymentHandle


@serve.deployment
class NoArgs:
    def __call__(self) -> str:
        return "called without the request"


@serve.deployment
async def no_args_function() -> dict[str, str]:
    return {"called": "without the request"}


@serve.deployment
class NoArgsAsync:
    async def __call__(self) -> str:
        return "async, without the request"


def test_http_calls_a_method_or_function_that_takes_no_argument(http_url: str) -> None:
    serve.run(NoArgs.bind(), name="a", route_prefix="/a")
    serve.run(no_args_function.bind(), name="b", route_prefix="/b")
    serve.run(NoArgsAsync.bind(), name="c", route_prefix="/c")
    assert httpx.get(f"{http_url}/a").text == "called without the request"
    assert httpx.post(f"{http_url}/b", content=b"ignored").json() == {
        "called": "without the request"
    }
    assert httpx.get(f"{http_url}/c").text == "async, without the request"
    # the handle calls them as before
    handle = serve.get_app_handle("a")
    assert handle.remote().result(timeout_s=30) == "called without the request"


def test_import_starlette_then_starlette_requests_request_works(http_url: str) -> None:
    # Evaluated where Ray Serve users write it: in the driver, at class definition (the
    # annotation), and in the replica.
    code = textwrap.dedent(
        """
        import starlette
        import serval as serve

        @serve.deployment
        class Typed:
            def __call__(self, request: starlette.requests.Request) -> str:
                return type(request).__name__ + " " + starlette.requests.Request.__name__

        print("ok", Typed.name)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "Typed"]

    import starlette

    @serve.deployment
    class Typed:
        def __call__(self, request: Any) -> str:
            return type(request).__name__ + " " + starlette.requests.Request.__name__

    serve.run(Typed.bind(), name="typed", route_prefix="/typed")
    assert httpx.get(f"{http_url}/typed").text == "Request Request"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Item(pydantic.BaseModel):
    name: str
    price: float


@serve.deployment
class Encodes:
    def __call__(self, request: Any) -> Any:
        kind = request.query_params.get("kind")
        if kind == "query":
            return request.query_params  # a Mapping, not a dict
        if kind == "model":
            return Item(name="pen", price=1.5)
        if kind == "dataclass":
            return Point(1, 2)
        if kind == "nested":
            return {"items": [Item(name="a", price=1.0)], "at": Point(3, 4), "tags": {"x"}}
        return float("nan")  # not JSON, even to FastAPI's encoder


def test_values_fastapis_encoder_takes_are_json(http_url: str) -> None:
    serve.run(Encodes.bind(), name="enc", route_prefix="/enc")
    get = lambda q: httpx.get(f"{http_url}/enc?{q}")  # noqa: E731
    reply = get("kind=query&a=1")
    assert reply.status_code == 200 and reply.json() == {"kind": "query", "a": "1"}
    assert reply.headers["content-type"] == "application/json"
    assert get("kind=model").json() == {"name": "pen", "price": 1.5}
    assert get("kind=dataclass").json() == {"x": 1, "y": 2}
    assert get("kind=nested").json() == {
        "items": [{"name": "a", "price": 1.0}],
        "at": {"x": 3, "y": 4},
        "tags": ["x"],
    }
    assert get("kind=nan").status_code == 500


def fastapi_factory() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    def root() -> str:
        return "built in the replica"

    @app.get("/twice/{n}")
    def twice(n: int) -> int:
        return 2 * n

    return app


@serve.deployment
@serve.ingress(fastapi_factory)
class FromFactory:
    pass


def test_ingress_takes_a_builder_of_the_fastapi_app(http_url: str) -> None:
    serve.run(FromFactory.bind(), name="factory", route_prefix="/factory")
    assert httpx.get(f"{http_url}/factory/").json() == "built in the replica"
    assert httpx.get(f"{http_url}/factory/twice/21").json() == 42


# -- Ray 2.0-2.6's handles -------------------------------------------------------------------------


@serve.deployment
class Doubler:
    def __call__(self, x: int) -> int:
        return 2 * x


@serve.deployment
class LegacyParent:
    def __init__(self, child: RayServeDeploymentHandle) -> None:
        self.child = child

    async def __call__(self, x: int) -> list[Any]:
        ref = await self.child.remote(x)  # Ray 2.0-2.6: awaiting remote() gives a ref
        return [type(self.child).__name__, await ref]


@serve.deployment
class Switcher:
    def __init__(self, child: Any) -> None:
        self.old = child.options(use_new_handle_api=False)
        self.new = child.options(use_new_handle_api=True)

    async def __call__(self, x: int) -> list[int]:
        ref = await self.old.remote(x)
        return [await ref, await self.new.remote(x)]


def test_a_constructor_annotated_with_the_legacy_handle_gets_one(serve_instance: Any) -> None:
    handle = serve.run(LegacyParent.bind(Doubler.bind()), name="legacy")
    assert handle.remote(4).result(timeout_s=30) == ["RayServeDeploymentHandle", 8]


def test_use_new_handle_api_switches_between_the_apis(serve_instance: Any) -> None:
    handle = serve.run(Switcher.bind(Doubler.bind()), name="switch")
    assert handle.remote(5).result(timeout_s=30) == [10, 10]


def test_rays_public_types_are_where_ray_has_them(serve_instance: Any) -> None:
    from serval.config import (  # noqa: F401 - importable is the point
        AutoscalingConfig,
        AutoscalingContext,
        AutoscalingPolicy,
        BackpressureConfig,
        DeploymentConfig,
        DeploymentMode,
        HTTPOptions,
        ProxyLocation,
        gRPCOptions,
    )
    from serval.context import ReplicaContext
    from serval.handle import (  # noqa: F401
        DeploymentHandle,
        DeploymentResponse,
        DeploymentResponseGenerator,
        RayServeHandle,
        RayServeSyncHandle,
    )
    from serval.schema import (  # noqa: F401
        ApplicationStatus,
        ApplicationStatusOverview,
        DeploymentSchema,
        DeploymentStatus,
        DeploymentStatusOverview,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
        ServeStatus,
        gRPCOptionsSchema,
    )

    serve.run(NoArgs.bind(), name="typed", route_prefix="/typed")
    status = serve.status()
    assert isinstance(status, ServeStatus)
    app = status.applications["typed"]
    assert isinstance(app, ApplicationStatusOverview)
    assert app.status == ApplicationStatus.RUNNING
    assert app.deployments["NoArgs"].status == DeploymentStatus.HEALTHY
    assert ProxyLocation.EveryNode == "EveryNode" and DeploymentMode.NoServer == "NoServer"

    @serve.deployment
    class Context:
        def __call__(self) -> bool:
            return isinstance(serve.get_replica_context(), ReplicaContext)

    assert serve.run(Context.bind(), name="ctx", route_prefix="/ctx").remote().result(30)


@serve.deployment(max_ongoing_requests=16)
class BatchedModels:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.5)
    async def handle(self, items: list[int]) -> list[str]:
        model = serve.get_multiplexed_model_id()  # the batch's: batches are split by model
        return [f"{model}:{len(items)}:{i}" for i in items]

    async def __call__(self, x: int) -> str:
        return await self.handle(x)


def test_get_multiplexed_model_id_inside_a_batch(serve_instance: Any) -> None:
    handle = serve.run(BatchedModels.bind(), name="batched", route_prefix=None)
    responses = [
        handle.options(multiplexed_model_id=model).remote(i)
        for i in range(4)
        for model in ("a", "b")
    ]
    got = sorted(r.result(timeout_s=30) for r in responses)
    assert got == sorted(f"{m}:4:{i}" for i in range(4) for m in ("a", "b"))


# -- responses nested in arguments ----------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    left: Any
    right: Any


@serve.deployment
class Summer:
    async def total(self, items: list[Any]) -> int:
        return sum([await item for item in items])  # the callee awaits them, as in Ray Serve

    async def from_dict(self, parts: dict[str, Any]) -> int:
        return await parts["a"] + parts["b"]

    async def from_pair(self, pair: Pair) -> int:
        return await pair.left + await pair.right

    def sync_total(self, items: tuple[Any, ...]) -> int:
        return sum(item.result() for item in items)


@serve.deployment
class Fails:
    def __call__(self, x: int) -> int:
        raise ValueError(f"no {x}")


@serve.deployment
class Fan:
    def __init__(self, summer: Any, doubler: Any) -> None:
        self.summer = summer
        self.doubler = doubler

    async def __call__(self, n: int) -> int:
        parts = [self.doubler.remote(i) for i in range(n)]
        return await self.summer.total.remote(parts)


def test_a_response_nested_in_an_argument_reaches_the_callee_to_await(serve_instance: Any) -> None:
    fan = serve.run(Fan.bind(Summer.bind(), Doubler.bind()), name="fan", route_prefix=None)
    assert fan.remote(4).result(timeout_s=30) == 12  # 0+2+4+6, inside the app
    summer = serve.get_deployment_handle("Summer", app_name="fan")
    doubler = serve.get_deployment_handle("Doubler", app_name="fan")
    parts = [doubler.remote(1), doubler.remote(2)]
    assert summer.total.remote(parts).result(timeout_s=30) == 6  # from the driver
    assert summer.from_dict.remote({"a": doubler.remote(5), "b": 1}).result(timeout_s=30) == 11
    pair = Pair(doubler.remote(3), doubler.remote(4))
    assert summer.from_pair.remote(pair).result(timeout_s=30) == 14
    assert summer.sync_total.remote((doubler.remote(10),)).result(timeout_s=30) == 20
    # a nested response that failed fails the call with its error
    failing = serve.run(Fails.bind(), name="fails", route_prefix=None)
    with pytest.raises(ValueError, match="no 7"):
        summer.total.remote([failing.remote(7)]).result(timeout_s=30)
