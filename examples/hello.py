"""Hello, serval: two deployments composed, called from Python and over HTTP.

Run it with `python examples/hello.py`, then, while it serves:
    curl "http://127.0.0.1:8000/?name=Alice"
Ctrl-C stops it (every serval process exits with it).
"""

import time

from starlette.requests import Request

import serval as serve


@serve.deployment
class Greeter:
    def greet(self, name: str) -> str:
        return f"Hello {name}!"


@serve.deployment(num_replicas=2)
class Frontend:
    def __init__(self, greeter) -> None:
        self.greeter = greeter  # a DeploymentHandle to Greeter

    async def say_hello(self, name: str) -> str:
        return (await self.greeter.greet.remote(name)).upper()

    async def __call__(self, request: Request) -> str:
        # HTTP calls the same internal method that Python callers use.
        return await self.say_hello(request.query_params.get("name", "world"))


if __name__ == "__main__":
    handle = serve.run(Frontend.bind(Greeter.bind()), route_prefix="/")

    # Modern handle: .remote() returns a DeploymentResponse; .result() waits for it.
    print(handle.say_hello.remote("Alice").result())

    # The ServeHandle guide's sync handle: .remote() returns an ObjectRef once assigned.
    legacy = Frontend.get_handle()
    refs = [legacy.say_hello.remote(name) for name in ("Bob", "Carol")]
    print(serve.get(refs))

    print('serving on http://127.0.0.1:8000 — try: curl "http://127.0.0.1:8000/?name=Alice"')
    print("Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
