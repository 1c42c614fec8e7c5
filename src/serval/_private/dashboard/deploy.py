"""The REST API's ``PUT /api/serve/applications/``: ``serval deploy`` in a subprocess.

The config is the whole desired state, as ``serval deploy`` treats a file (apps not in it are
deleted, changed ones roll, unchanged ones stay). The dashboard process never imports user
code: the CLI does, in a process of its own, with the user's code path and the directory the
cluster was started from as its working directory — where ``serve.run`` would have found it.
One deploy runs at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass

__all__ = ["DeployRunner", "Outcome"]

_DEPLOY_TIMEOUT_S = 300.0
_CLI_PREFIX = "serval: error: "


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str


class DeployRunner:
    def __init__(self, address: str, cwd: str, env: dict[str, str]) -> None:
        self.address = address
        self.cwd = cwd if os.path.isdir(cwd) else None  # (gone since: the CLI's own)
        self.env = env
        self._lock = asyncio.Lock()

    async def deploy(self, config: dict[str, object]) -> Outcome:
        async with self._lock:
            with tempfile.TemporaryDirectory(prefix="serval-put-") as tmp:  # (0700)
                path = os.path.join(tmp, "config.json")
                await asyncio.to_thread(_write, path, config)
                return await self._run(path)

    async def _run(self, path: str) -> Outcome:
        argv = [sys.executable, "-m", "serval", "deploy", "--address", self.address, path]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), _DEPLOY_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode == 0:
            return Outcome(True, out.decode(errors="replace").strip())
        message = _error_of(err.decode(errors="replace"), proc.returncode)
        return Outcome(False, message.replace(f"{path}: ", "").replace(path, "the config"))


def _write(path: str, config: dict[str, object]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(config, f)


def _error_of(stderr: str, code: int | None) -> str:
    """The CLI's error line (it prints one, never a traceback), without its prefix."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(_CLI_PREFIX):
            return line[len(_CLI_PREFIX) :].strip()
    return f"the deploy failed (exit code {code})"
