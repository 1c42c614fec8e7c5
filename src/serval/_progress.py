"""Progress of a deploy, from the controller's status: replicas starting ("2/4 running"), and
replicas slow to start named with what they wait on.

Logged to ``logging.getLogger("serval.progress")`` (a child of ``"serval"``) at INFO, on change
only; the library configures no logging, so a script sees these lines once it enables INFO
(the ``serval`` command does). Nothing is asked of the controller when INFO is off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

from serval.status import DeploymentStatusOverview, ServeStatus

if TYPE_CHECKING:
    from serval._private.wire.control import ControllerCalls

__all__ = ["Progress", "finish", "tracker", "watch"]

logger = logging.getLogger("serval.progress")

POLL_S = 0.4  # how often the controller's status is read while apps deploy
SLOW_S = 3.0  # a replica this long in one phase of starting is named
EVERY_S = 10.0  # ... and named again after each further this long


class Progress:
    """Turns successive statuses into log lines about ``apps``: what changed since the last."""

    def __init__(self, apps: Collection[str], slow_s: float = SLOW_S, every_s: float = EVERY_S):
        self.apps = set(apps)
        self.slow_s = slow_s
        self.every_s = every_s
        self._counts: dict[tuple[str, str], str] = {}
        self._slow: set[tuple[str, str, int]] = set()

    def update(self, status: ServeStatus) -> list[str]:
        """The lines ``status`` adds (each also logged)."""
        lines: list[str] = []
        for app_name in sorted(self.apps & status.applications.keys()):
            app = status.applications[app_name]
            for dep_name, dep in app.deployments.items():
                label = _label(app_name, dep_name)
                counts = f"deployment {label}: {_counts(dep)}"
                if self._counts.get((app_name, dep_name)) != counts:
                    self._counts[(app_name, dep_name)] = counts
                    lines.append(counts)
                lines.extend(self._slow_replicas(label, dep))
        for line in lines:
            logger.info("%s", line)
        return lines

    def _slow_replicas(self, label: str, dep: DeploymentStatusOverview) -> list[str]:
        lines = []
        for replica in dep.replicas:
            if replica.state != "STARTING" or replica.phase_s < self.slow_s:
                continue
            step = int((replica.phase_s - self.slow_s) // self.every_s)
            key = (replica.replica_id, replica.phase, step)
            if key in self._slow:
                continue
            self._slow.add(key)
            lines.append(
                f"replica {replica.replica_id} of {label} is {replica.phase} "
                f"(for {replica.phase_s:.0f} s)"
            )
        return lines


def _label(app: str, deployment: str) -> str:
    return repr(deployment) if app == "default" else f"{deployment!r} (application {app!r})"


def _counts(dep: DeploymentStatusOverview) -> str:
    states = dep.replica_states
    text = f"{states.get('RUNNING', 0)}/{dep.target_replicas} replicas running"
    for state in ("STARTING", "STOPPING"):
        if states.get(state):
            text += f", {states[state]} {state.lower()}"
    return text


def tracker(apps: Collection[str]) -> Progress | None:
    """A ``Progress`` of ``apps``, or None when INFO is off (then nothing is asked)."""
    return Progress(apps) if logger.isEnabledFor(logging.INFO) else None


async def watch(controller: ControllerCalls, progress: Progress | None) -> None:
    """Log ``progress`` every ``POLL_S`` until cancelled."""
    while progress is not None:
        if not await _update(controller, progress):
            return
        await asyncio.sleep(POLL_S)


async def finish(controller: ControllerCalls, progress: Progress | None) -> None:
    """The last lines: where the deploy ended."""
    if progress is not None:
        await _update(controller, progress)


async def _update(controller: ControllerCalls, progress: Progress) -> bool:
    try:
        progress.update(await controller.status())
    except Exception:  # (the deploy itself reports a lost controller, and why)
        logger.debug("status for progress failed", exc_info=True)
        return False
    return True
