"""Ray Serve's documented behaviour, where serval differed (issue 13), tried the way Ray Serve's
guides write it: HTTP to a method or function that takes no argument, and
``starlette.requests.Request`` found after a bare ``import starlette``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import httpx

import serval as serve


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
