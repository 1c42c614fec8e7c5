"""An app for the `serval` command and config files.

serval run examples.config_app:app --port 8000            # the bound app
serval run examples.config_app:build greeting=Howdy       # an app builder with args
serval build examples.config_app:app -o serve_config.yaml
serval start && serval deploy examples/serve_config.yaml && serval status
curl "http://127.0.0.1:8000/?name=Alice"
serval shutdown -y
"""

from __future__ import annotations

import os

from starlette.requests import Request

import serval as serve
from serval import Application


@serve.deployment
class Greeter:
    def __init__(self, greeting: str = "Hello") -> None:
        self.greeting = greeting
        self.punctuation = "!"

    def reconfigure(self, user_config: dict[str, str]) -> None:
        self.punctuation = user_config.get("punctuation", "!")

    def greet(self, name: str) -> str:
        return f"{self.greeting} {name}{self.punctuation}"


@serve.deployment(max_ongoing_requests=10)
class Frontend:
    def __init__(self, greeter: object) -> None:
        self.greeter = greeter  # a DeploymentHandle to Greeter

    async def __call__(self, request: Request) -> str:
        name = request.query_params.get("name", "world")
        text: str = await self.greeter.greet.remote(name)  # type: ignore[attr-defined]
        suffix = os.environ.get("GREETING_SUFFIX", "")
        return text + suffix


app = Frontend.bind(Greeter.bind())


def build(args: dict[str, str]) -> Application:
    """An app builder (Ray Serve's pattern): `import_path: examples.config_app:build`."""
    return Frontend.bind(Greeter.bind(args.get("greeting", "Hello")))
