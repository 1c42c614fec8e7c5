"""The layout's rules, checked on the source: no module of ``src/serval`` imports another in a
cycle (counting every import: at the top, under ``TYPE_CHECKING`` and inside functions), and
each room of ``serval._private`` imports only the rooms its docstring allows
(``serval/_private/__init__.py``). Run it alone with ``python -m pytest tests/test_layout.py``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PRIVATE = "serval._private"

# room -> the rooms (of serval._private) and public modules it may import. Public leaf
# modules (exceptions, config, status, grpc_util) are allowed everywhere.
LEAVES = {
    "serval.exceptions",
    "serval.config",
    "serval.status",
    "serval.grpc_util",
    "serval.logging_config",
}
ROOMS: dict[str, set[str]] = {
    "wire": {"telemetry"},
    "telemetry": set(),
    "caller": {"wire"},
    "replica": {"wire", "caller", "telemetry", "serval.ingress"},
    "proxy": {"wire", "caller", "telemetry"},
    "controller": {"wire", "serval._private.backends.base", "telemetry"},
    "backends": {
        "wire",
        "telemetry",
        "serval._private.process.procs",
        "serval._private.process.settings",
    },
    "dashboard": {"wire", "caller", "telemetry"},
    "process": {
        "wire",
        "caller",
        "replica",
        "proxy",
        "controller",
        "backends",
        "telemetry",
        "dashboard",
    },
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "serval").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every serval module that ``name`` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                target = f"{base}.{alias.name}"
                yield from _resolve(target if target in MODULES else base)


def _resolve(name: str) -> Iterator[str]:
    if name.startswith("serval") and name in MODULES:
        yield name


GRAPH = {name: set(_imports(name, path)) - {name} for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def _room(module: str) -> str | None:
    if not module.startswith(PRIVATE + "."):
        return None
    return module.split(".")[2]


def test_no_module_imports_another_in_a_cycle() -> None:
    assert _cycles() == []


def test_each_room_imports_only_what_its_rules_allow() -> None:
    wrong = []
    for module, targets in sorted(GRAPH.items()):
        room = _room(module)
        if room is None or room not in ROOMS:
            continue
        allowed = ROOMS[room] | {room}
        for target in sorted(targets):
            target_room = _room(target)
            ok = (
                target in LEAVES
                or target_room in allowed
                or any(target == a or target.startswith(a + ".") for a in allowed)
            )
            if not ok:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_every_room_is_known_and_documented() -> None:
    for room_dir in (SRC / "serval" / "_private").iterdir():
        if room_dir.is_dir() and (room_dir / "__init__.py").exists():
            assert room_dir.name in ROOMS, room_dir.name
            doc = ast.get_docstring(ast.parse((room_dir / "__init__.py").read_text()))
            assert doc and "may import" in doc.lower(), f"{room_dir.name}/__init__.py: its rules"
