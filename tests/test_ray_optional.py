"""Ray is imported only when the Ray backend is chosen: a local application, its handles (the
guide's legacy ones included), HTTP and the CLI's verbs never import it (a user without
``serval[ray]`` installed has no ``ray`` to import)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = """
import sys
import serval as serve
from chaos.harness import free_port

@serve.deployment
class Echo:
    def __call__(self, x=None):
        return x

serve.start(http_options={"port": free_port()})
handle = serve.run(Echo.bind())
assert handle.remote(1).result(timeout_s=30) == 1
assert serve.get(Echo.get_handle().remote(2), timeout=30) == 2
serve.status()
from serval import cli
from serval._private.caller import runtime
for verb in (["status"], ["status", "-o", "json"], ["config"]):
    assert cli.main([*verb, "--address", runtime.address()]) == 0, verb
serve.shutdown()
print("ray imported:", "ray" in sys.modules)
"""


def test_a_local_app_never_imports_ray() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SERVAL_BACKEND")}
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ray imported: False" in proc.stdout
