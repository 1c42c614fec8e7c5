"""The floor for HTTP: a bare ASGI app on uvicorn (httptools + uvloop), one process.

It answers every request with ``200 ok`` and does nothing else: no routing, no request id, no
second process. It is the fastest a Python HTTP stack goes on this machine, so it is the
yardstick that ``http_bench.py`` divides serval's HTTP figures by.

The response carries a ``content-length`` (as serval's proxy's responses do) and uvicorn runs
with the settings serval's proxy uses: no access log, no ``server`` or ``date`` header, no
proxy-headers middleware, no lifespan.

    python benchmarks/_floor_asgi.py [--port 8000]    # serve it; then e.g. wrk http://127.0.0.1:8000/

``http_bench.py`` runs it as ``python -m uvicorn _floor_asgi:app --app-dir benchmarks ...``.
"""

from __future__ import annotations

from typing import Any

_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"2")],
}
_BODY = {"type": "http.response.body", "body": b"ok"}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(_START)
    await send(_BODY)


def uvicorn_args(port: int, host: str = "127.0.0.1") -> list[str]:
    """Command-line options for ``python -m uvicorn _floor_asgi:app``."""
    return [
        "--host",
        host,
        "--port",
        str(port),
        "--http",
        "httptools",
        "--loop",
        "uvloop",
        "--lifespan",
        "off",
        "--log-level",
        "warning",
        "--no-access-log",
        "--no-server-header",
        "--no-date-header",
        "--no-proxy-headers",
    ]


if __name__ == "__main__":
    import argparse
    import os
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    opts = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "_floor_asgi:app",
        "--app-dir",
        here,
        *uvicorn_args(opts.port, opts.host),
    ]
    os.execv(sys.executable, argv)
