"""Plain HTTP ingress through the proxy: the Starlette Request a deployment's ``__call__`` gets,
Ray Serve's conversions of what it returns, the same deployment serving HTTP and handles,
composition over handles while serving HTTP, and route prefixes with the system routes."""

from __future__ import annotations

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

import serval as serve
from conftest import poll

# -- the request -------------------------------------------------------------------------------


@serve.deployment
class Inspect:
    async def __call__(self, request: Request) -> dict:
        body = await request.body()
        return {
            "method": request.method,
            "path": request.url.path,
            "query": dict(request.query_params),
            "multi": request.query_params.getlist("tag"),
            "header": request.headers.get("x-custom"),
            "content_type": request.headers.get("content-type"),
            "body": body.decode(),
            "json": (await request.json())
            if body and request.headers.get("content-type") == "application/json"
            else None,
        }


def test_call_gets_a_starlette_request(http_url: str) -> None:
    serve.run(Inspect.bind(), route_prefix="/inspect")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        r = client.get("/inspect/some/path?name=Alice&tag=a&tag=b", headers={"x-custom": "yes"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        got = r.json()
        assert got["method"] == "GET"
        assert got["path"] == "/inspect/some/path"
        assert got["query"]["name"] == "Alice"
        assert got["multi"] == ["a", "b"]
        assert got["header"] == "yes"
        assert got["body"] == ""

        r = client.post("/inspect", json={"x": [1, 2, 3]})
        assert r.status_code == 200
        got = r.json()
        assert got["method"] == "POST"
        assert got["path"] == "/inspect"
        assert got["json"] == {"x": [1, 2, 3]}

        for method in ("PUT", "DELETE", "PATCH"):
            r = client.request(method, "/inspect/x", content=b"raw bytes \xc3\xa9")
            assert r.status_code == 200, method
            assert r.json()["method"] == method
            assert r.json()["body"] == "raw bytes \u00e9"


@serve.deployment
class SyncInspect:
    def __call__(self, request: Request) -> str:
        # a sync __call__ runs in a thread; query params and headers are there as usual
        return f"{request.method} {request.query_params.get('q')} {request.headers.get('x-h')}"


def test_sync_call_gets_a_request(http_url: str) -> None:
    serve.run(SyncInspect.bind(), route_prefix="/")
    r = httpx.get(f"{http_url}/?q=42", headers={"x-h": "hv"}, timeout=10)
    assert r.status_code == 200
    assert r.text == "GET 42 hv"


# -- the response ------------------------------------------------------------------------------


class Created(PlainTextResponse):
    """A user's Response subclass."""


def _result(kind: str):
    if kind == "str":
        return "hello text"
    if kind == "bytes":
        return b"\x00\x01binary\xff"
    if kind == "dict":
        return {"a": 1, "b": [True, None, "x"]}
    if kind == "list":
        return [1, "two", {"three": 3}]
    if kind == "response":
        return Response(
            b"teapot",
            status_code=418,
            headers={"x-kept": "kept"},
            media_type="application/x-custom",
        )
    if kind == "subclass":
        return Created("made it", status_code=201, headers={"location": "/things/7"})
    if kind == "json-response":
        return JSONResponse({"status": "accepted"}, status_code=202, headers={"x-extra": "1"})
    if kind == "stream":
        return StreamingResponse(iter([b"a", b"b", b"c"]), media_type="text/plain")
    raise AssertionError(kind)


@serve.deployment
class Returns:
    async def __call__(self, request: Request):
        return _result(request.query_params["kind"])


@serve.deployment
class SyncReturns:
    # A sync __call__ runs whole on a worker thread; what is not a plain result is finished
    # on the replica's loop (Response objects, streams).
    def __call__(self, request: Request):
        return _result(request.query_params["kind"])


@pytest.mark.parametrize("deployment", [Returns, SyncReturns], ids=["async", "sync"])
def test_return_value_conversions(http_url: str, deployment) -> None:
    serve.run(deployment.bind(), route_prefix="/r")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        r = client.get("/r", params={"kind": "str"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert r.text == "hello text"

        r = client.get("/r", params={"kind": "bytes"})
        assert r.status_code == 200
        assert r.content == b"\x00\x01binary\xff"

        r = client.get("/r", params={"kind": "dict"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"a": 1, "b": [True, None, "x"]}

        r = client.get("/r", params={"kind": "list"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.json() == [1, "two", {"three": 3}]

        r = client.get("/r", params={"kind": "response"})
        assert r.status_code == 418
        assert r.headers["x-kept"] == "kept"
        assert r.headers["content-type"] == "application/x-custom"
        assert r.content == b"teapot"

        r = client.get("/r", params={"kind": "subclass"})
        assert r.status_code == 201
        assert r.headers["location"] == "/things/7"
        assert r.headers["content-type"].startswith("text/plain")
        assert r.text == "made it"

        r = client.get("/r", params={"kind": "json-response"})
        assert r.status_code == 202
        assert r.headers["x-extra"] == "1"
        assert r.json() == {"status": "accepted"}

        r = client.get("/r", params={"kind": "stream"})
        assert r.status_code == 200
        assert r.text == "abc"

        r = client.get("/r", params={"kind": "unknown"})  # the AssertionError in user code
        assert r.status_code == 500
        assert "AssertionError" not in r.text


# -- HTTP and Python, one deployment -----------------------------------------------------------


@serve.deployment
class Hello:
    def say_hello(self, name: str) -> str:
        return f"hello {name}"

    async def __call__(self, request: Request) -> str:
        return self.say_hello(request.query_params["name"])


def test_same_deployment_serves_http_and_handles(http_url: str) -> None:
    handle = serve.run(Hello.bind(), route_prefix="/hello")
    r = httpx.get(f"{http_url}/hello", params={"name": "http"}, timeout=10)
    assert r.status_code == 200
    assert r.text == "hello http"
    assert handle.say_hello.remote(name="python").result(timeout_s=10) == "hello python"
    assert serve.get_app_handle("default").say_hello.remote("app").result(timeout_s=10) == (
        "hello app"
    )


# -- composition -------------------------------------------------------------------------------


@serve.deployment
class Doubler:
    async def double(self, x: int) -> int:
        return 2 * x


@serve.deployment
class Adder:
    def add(self, x: int, y: int) -> int:
        return x + y


@serve.deployment
class Composed:
    def __init__(self, doubler, adder) -> None:
        self.doubler = doubler
        self.adder = adder

    async def __call__(self, request: Request) -> dict:
        x = int(request.query_params["x"])
        doubled = await self.doubler.double.remote(x)
        # a response passed as an argument is resolved first (chaining without waiting)
        chained = await self.adder.add.remote(self.doubler.double.remote(x), 1)
        return {"doubled": doubled, "chained": chained}


def test_ingress_calls_other_deployments_while_serving_http(http_url: str) -> None:
    serve.run(Composed.bind(Doubler.bind(), Adder.bind()), route_prefix="/calc")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        for x in (0, 5, 21):
            r = client.get("/calc", params={"x": x})
            assert r.status_code == 200
            assert r.json() == {"doubled": 2 * x, "chained": 2 * x + 1}


# -- routes ------------------------------------------------------------------------------------


def _named(text: str):
    @serve.deployment(name=f"Named_{text.strip('/').replace('/', '_') or 'root'}")
    class Named:
        def whoami(self) -> str:
            return text

        async def __call__(self, request: Request) -> dict:
            return {"app": text, "path": request.url.path}

    return Named


def test_longest_prefix_wins_and_404_without_match(http_url: str) -> None:
    serve.run(_named("a").bind(), name="app_a", route_prefix="/a")
    serve.run(_named("ab").bind(), name="app_ab", route_prefix="/a/b")
    serve.run(_named("other").bind(), name="app_other", route_prefix="/other")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        cases = {
            "/a": "a",
            "/a/": "a",
            "/a/x": "a",
            "/a/bc": "a",  # /a/b is a prefix of the path's text but not of its segments
            "/a/b": "ab",
            "/a/b/": "ab",
            "/a/b/c/d": "ab",
            "/other/thing": "other",
        }
        for path, app in cases.items():
            r = client.get(path)
            assert r.status_code == 200, path
            assert r.json()["app"] == app, path
            assert r.headers.get("x-request-id")

        for path in ("/", "/nothing", "/ab", "/aa/b", "/othe"):
            r = client.get(path)
            assert r.status_code == 404, path
            assert r.headers.get("x-request-id"), path

        r = client.get("/-/routes")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/json")
        assert r.json() == {"/a": "app_a", "/a/b": "app_ab", "/other": "app_other"}


def test_root_prefix_catches_everything_else(http_url: str) -> None:
    serve.run(_named("root").bind(), name="root", route_prefix="/")
    serve.run(_named("deep").bind(), name="deep", route_prefix="/deep")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        assert client.get("/").json()["app"] == "root"
        assert client.get("/anything/else").json()["app"] == "root"
        assert client.get("/deep/er").json()["app"] == "deep"
        assert client.get("/deeper").json()["app"] == "root"
        assert client.get("/-/routes").json() == {"/": "root", "/deep": "deep"}


def test_route_prefix_none_is_not_exposed_but_callable_by_handle(http_url: str) -> None:
    hidden = serve.run(_named("hidden").bind(), name="hidden", route_prefix=None)
    serve.run(_named("shown").bind(), name="shown", route_prefix="/shown")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        assert client.get("/-/routes").json() == {"/shown": "shown"}
        assert client.get("/shown").status_code == 200
        for path in ("/", "/hidden", "/Named_hidden"):
            assert client.get(path).status_code == 404, path
    assert hidden.whoami.remote().result(timeout_s=10) == "hidden"
    assert serve.get_app_handle("hidden").whoami.remote().result(timeout_s=10) == "hidden"


def test_healthz_and_routes_with_no_application(http_url: str) -> None:
    serve.run(_named("x").bind(), name="x", route_prefix="/x")  # the proxy is surely up
    serve.delete("x")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        poll(
            lambda: client.get("/-/routes").json() == {},
            timeout=5.0,
            what="the route table to be empty",
            interval=0.02,
        )
        r = client.get("/-/healthz")
        assert r.status_code == 200
        assert r.text == "success"
        assert r.headers.get("x-request-id")
        assert client.get("/").status_code == 404
        assert client.get("/-/nothing").status_code == 404


def test_proxy_listens_when_start_returns(http_url: str) -> None:
    # Ray Serve's serve.start() waits for its proxies to be ready: a curl right after works.
    r = httpx.get(f"{http_url}/-/healthz", timeout=10)
    assert r.status_code == 200
    assert r.text == "success"


def test_deleting_an_app_removes_its_route(http_url: str) -> None:
    serve.run(_named("keep").bind(), name="keep", route_prefix="/keep")
    serve.run(_named("gone").bind(), name="gone", route_prefix="/gone")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        assert client.get("/gone/x").status_code == 200
        serve.delete("gone")
        poll(
            lambda: client.get("/-/routes").json() == {"/keep": "keep"},
            timeout=5.0,
            what="the route table to hold /keep only",
            interval=0.02,
        )
        poll(
            lambda: client.get("/gone/x").status_code == 404,
            timeout=5.0,
            what="/gone to answer 404",
            interval=0.02,
        )
        assert client.get("/keep").status_code == 200


def test_redeploying_an_app_under_a_new_prefix_moves_it(http_url: str) -> None:
    serve.run(_named("v1").bind(), name="moving", route_prefix="/old")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        assert client.get("/old").json()["app"] == "v1"
        serve.run(_named("v1").bind(), name="moving", route_prefix="/new")
        poll(
            lambda: client.get("/-/routes").json() == {"/new": "moving"},
            timeout=5.0,
            what="the route table to hold /new only",
            interval=0.02,
        )
        assert client.get("/new").json()["app"] == "v1"
        assert client.get("/old").status_code == 404


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS"])
def test_other_methods_reach_the_deployment(http_url: str, method: str) -> None:
    serve.run(Returns.bind(), route_prefix="/r")
    r = httpx.request(method, f"{http_url}/r", params={"kind": "str"}, timeout=10)
    assert r.status_code == 200
    assert r.headers.get("x-request-id")
