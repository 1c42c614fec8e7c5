"""``serval status``: the cluster's applications, deployments and replicas, as a table (rich)
for people, or as YAML (Ray's ``serve status`` shape) or JSON (the same data) for tools."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import yaml  # type: ignore[import-untyped]

from serval.status import ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

__all__ = ["FORMATS", "print_status", "status_data", "to_yaml"]

FORMATS = ("table", "json", "yaml")

_STYLES = {
    "RUNNING": "green",
    "HEALTHY": "green",
    "DEPLOYING": "yellow",
    "UPDATING": "yellow",
    "STARTING": "yellow",
    "STOPPING": "yellow",
    "DELETING": "yellow",
    "UPSCALING": "yellow",
    "DOWNSCALING": "yellow",
}


def print_status(status: ServeStatus, address: str, output: str, only: str | None) -> None:
    apps = {n: a for n, a in status.applications.items() if only is None or n == only}
    if output == "table":
        _print_table(apps, address)
        return
    data = status_data(apps, address)
    if output == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(to_yaml(data))


def status_data(apps: dict[str, ApplicationStatusOverview], address: str) -> dict[str, Any]:
    """What ``-o yaml`` and ``-o json`` print."""
    return {
        "address": address,
        "applications": {
            name: {
                "status": app.status,
                "route_prefix": app.route_prefix,
                "message": app.message,
                "last_deployed": _when(app.last_deployed_time_s),
                "deployments": {
                    dep_name: {
                        "status": dep.status,
                        "replica_states": dict(dep.replica_states),
                        "message": dep.message,
                    }
                    for dep_name, dep in app.deployments.items()
                },
            }
            for name, app in apps.items()
        },
    }


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def to_yaml(data: Any) -> str:
    class Dumper(yaml.SafeDumper):  # type: ignore[misc]
        pass

    def text(dumper: Any, value: str) -> Any:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    out: str = yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=False)
    return out


# -- the table -----------------------------------------------------------------------------------


def _print_table(apps: dict[str, ApplicationStatusOverview], address: str) -> None:
    from rich.console import Console  # (only the table needs it: -o yaml stays light)
    from rich.markup import escape
    from rich.table import Table

    console = Console()  # colour only on a terminal (and never with NO_COLOR)
    console.print(f"serval cluster at [bold]{escape(address)}[/bold]", highlight=False)
    if not apps:
        console.print("No applications.")
        return
    table = Table(highlight=False)
    for column in ("APPLICATION", "STATUS", "ROUTE", "DEPLOYMENT", "STATUS", "REPLICAS"):
        table.add_column(column, overflow="fold")
    reasons: list[str] = []  # below the table: lines of any width wrap there, not in a cell
    for name, app in apps.items():
        head = [escape(name), _styled(app.status), escape(app.route_prefix or "-")]
        for dep_name, dep in app.deployments.items():
            table.add_row(*head, escape(dep_name), _styled(dep.status), _replicas(dep))
            head = ["", "", ""]
            reasons += _reasons(name, dep_name, dep)
        if not app.deployments:  # (none yet)
            table.add_row(*head, "", "", "")
            if app.message:
                reasons.append(f"application {name!r}: {_reason(app.message)}")
    console.print(table)
    if reasons:
        console.print("Not running or not healthy, and why:")
        for line in reasons:  # (one line each, wrapped by a terminal only: greppable)
            console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)


def _reasons(app: str, name: str, dep: DeploymentStatusOverview) -> list[str]:
    """Why a deployment is not healthy, and what each of its replicas that does not run does."""
    where = repr(name) if app == "default" else f"{name!r} (application {app!r})"
    lines = []
    if dep.message:
        lines.append(f"deployment {where}, {dep.status}: {_reason(dep.message)}")
    for replica in dep.replicas:
        if replica.state != "RUNNING":
            doing = f", {replica.phase} for {replica.phase_s:.0f} s" if replica.phase else ""
            lines.append(f"replica {replica.replica_id} of {where}: {replica.state}{doing}")
    return lines


def _styled(state: str) -> str:
    return f"[{_STYLES.get(state, 'red')}]{state}[/]"


def _replicas(dep: DeploymentStatusOverview) -> str:
    states = dep.replica_states
    text = f"{states.get('RUNNING', 0)}/{dep.target_replicas} running"
    others = ", ".join(f"{n} {s.lower()}" for s, n in states.items() if s != "RUNNING" and n)
    return f"{text}, {others}" if others else text


def _reason(message: str) -> str:
    """A message in one line: a traceback's exception (its last line), else its first and last
    lines."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        return lines[-1]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} ... {lines[-1]}"
