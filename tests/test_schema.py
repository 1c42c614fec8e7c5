"""Config files in Ray Serve's schema: what is accepted; errors name file, field and reason."""

from __future__ import annotations

import dataclasses
import itertools
import textwrap
from pathlib import Path
from typing import Any

import pytest

from serval.config import RENAMED_AUTOSCALING_OPTIONS, AutoscalingConfig
from serval.deployment import Application
from serval.schema import (
    AutoscalingConfigSchema,
    ConfigError,
    application_config,
    build_application,
    load_config,
    parse_config,
    source_config,
    walk,
)

EXAMPLE = Path(__file__).parent.parent / "examples" / "serve_config.yaml"
_ids = itertools.count()

APP_MODULE = """
import os
from pydantic import BaseModel
import serval as serve

@serve.deployment(num_replicas=2)
class Leaf:
    def __init__(self, tag="leaf"):
        self.tag = tag

@serve.deployment(max_ongoing_requests=7)
class Root:
    def __init__(self, left, right, extra=None):
        pass

leaf = Leaf.bind()
app = Root.bind(leaf, Leaf.bind("second"), extra={"nested": [leaf]})
not_an_app = 42

def builder(args):
    return Root.bind(Leaf.bind(args["tag"]), None)

class Args(BaseModel):
    replicas: int
    tag: str = "typed"

def typed_builder(args: Args):
    return Leaf.options(num_replicas=args.replicas).bind(args.tag)
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh importable module (a new name each time: no stale sys.modules entry)."""
    name = f"schema_app_{next(_ids)}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(APP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def deployments(app: Application) -> dict[str, Any]:
    return {name: node.deployment.config for name, node in walk(app)}


# -- accepted files ------------------------------------------------------------------------------


def test_example_file_is_valid() -> None:
    cfg = load_config(str(EXAMPLE))
    (app,) = cfg.applications
    assert app.name == "greet"
    assert app.import_path == "examples.config_app:build"
    assert app.args == {"greeting": "Howdy"}
    assert app.runtime_env.env_vars == {"GREETING_SUFFIX": " (served by serval)"}
    assert [d.name for d in app.deployments] == ["Greeter", "Frontend"]
    assert app.deployments[0].overrides() == {
        "num_replicas": 2,
        "user_config": {"punctuation": "!!"},
    }
    assert cfg.http().port == 8000


def test_defaults_and_ray_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        proxy_location: Disabled
        http_options: {host: 0.0.0.0, port: 9001, request_timeout_s: 5, root_path: /api}
        grpc_options: {port: 9000, grpc_servicer_functions: []}
        logging_config: {log_level: INFO}
        applications:
          - import_path: mod.sub.app
            route_prefix: null
          - name: b
            import_path: mod:app
            route_prefix: /b
            deployments:
              - name: X
                num_replicas: auto
                max_queued_requests: -1
                ray_actor_options: {num_cpus: 0.5, runtime_env: {env_vars: {A: "1"}}}
        """,
    )
    cfg = load_config(path)
    assert cfg.applications[0].name == "default"
    assert cfg.applications[0].route_prefix is None
    http = cfg.http(port=9002)
    assert (http.host, http.port, http.request_timeout_s, http.root_path) == (
        "0.0.0.0",
        9002,
        5,
        "/api",
    )
    assert http.enabled is False
    assert cfg.applications[1].deployments[0].num_replicas == "auto"


# -- rejected files: file, field, reason ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        (  # unknown field, with a suggestion
            """
            applications:
              - import_path: m:a
                deployments:
                  - name: A
                  - name: B
                    num_replica: 2
            """,
            "applications[0].deployments[1].num_replica",
            "did you mean 'num_replicas'",
        ),
        (  # wrong type
            """
            applications:
              - import_path: m:a
                deployments: [{name: A}, {name: B, num_replicas: two}]
            """,
            "applications[0].deployments[1].num_replicas",
            "'two'",
        ),
        (
            """
            http_options: {port: "8000"}
            applications: [{import_path: m:a}]
            """,
            "http_options.port",
            "valid integer",
        ),
        (
            """
            applications: [{import_path: m:a, deployments: [{name: A, max_ongoing_requests: 0}]}]
            """,
            "applications[0].deployments[0].max_ongoing_requests",
            "greater than or equal to 1",
        ),
        (
            """
            applications: [{import_path: m:a}, {import_path: n:b, route_prefix: /b}]
            """,
            "applications[1].name",
            "duplicate application name 'default'",
        ),
        (
            """
            applications: [{name: a, import_path: m:a}, {name: b, import_path: n:b}]
            """,
            "applications[1].route_prefix",
            "already used by applications[0]",
        ),
        (
            """
            applications: [{import_path: m:a, deployments: [{name: A}, {name: A}]}]
            """,
            "applications[0].deployments[1].name",
            "duplicate deployment 'A'",
        ),
        (
            """
            applications: [{import_path: m:a, runtime_env: {pipp: [torch]}}]
            """,
            "applications[0].runtime_env.pipp",
            "serval knows env_vars, working_dir",
        ),
        (
            """
            applications: [{import_path: m:a, deployments: [{name: A, max_replicas_per_node: 0}]}]
            """,
            "applications[0].deployments[0].max_replicas_per_node",
            "greater than or equal to 1",
        ),
        (
            """
            applications: [{name: a}]
            """,
            "applications[0].import_path",
            "required",
        ),
        (
            """
            applications: [{import_path: "no colon or dot"}]
            """,
            "applications[0].import_path",
            "module:attribute",
        ),
        (
            """
            applications: [{import_path: m:a, route_prefix: api}]
            """,
            "applications[0].route_prefix",
            "must start with '/'",
        ),
        (
            """
            applications:
              - import_path: m:a
                deployments:
                  - name: A
                    autoscaling_config: {min_replicas: 3, max_replicas: 2}
            """,
            "applications[0].deployments[0].autoscaling_config",
            "max_replicas",
        ),
        (
            """
            applicatons: []
            """,
            "applicatons",
            "did you mean 'applications'",
        ),
    ],
)
def test_bad_field_is_named(tmp_path: Path, body: str, field: str, reason: str) -> None:
    path = write(tmp_path, body)
    err = error_of(path)
    assert any(f == field and reason in r for f, r in err.problems), err.problems
    message = str(err)
    assert message.startswith(f"{path}: ")
    assert field in message and reason in message
    assert "\n" not in message


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "applications:\n  - import_path: m:a\n   oops: [\n")
    message = str(error_of(path))
    assert message.startswith(f"{path}: line 3")
    assert "invalid YAML" in message


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    assert "expected a mapping" in str(error_of(write(tmp_path, "- a\n- b\n")))
    assert "empty" in str(error_of(write(tmp_path, "", "empty.yaml")))
    missing = str(tmp_path / "nope.yaml")
    assert str(error_of(missing)) == f"{missing}: No such file or directory"


def test_autoscaling_schema_follows_the_dataclass() -> None:
    names = {f.name for f in dataclasses.fields(AutoscalingConfig)}
    deprecated = {*RENAMED_AUTOSCALING_OPTIONS, "smoothing_factor"}  # still taken, warned
    assert set(AutoscalingConfigSchema.model_fields) == names | deprecated


def test_deprecated_names_in_a_file_are_taken_with_a_warning(app_module: str) -> None:
    cfg = parse_config(
        {
            "applications": [
                {
                    "import_path": f"{app_module}:app",
                    "deployments": [
                        {
                            "name": "Leaf",
                            "max_concurrent_queries": 9,
                            "autoscaling_config": {
                                "max_replicas": 3,
                                "target_num_ongoing_requests_per_replica": 4,
                            },
                        }
                    ],
                }
            ]
        },
        "deprecated.yaml",
    )
    with pytest.warns(DeprecationWarning):
        app = build_application(cfg.applications[0], 0, "deprecated.yaml")
    leaf = dict(walk(app))["Leaf"].deployment.config
    assert leaf.max_ongoing_requests == 9
    assert leaf.autoscaling_config is not None
    assert leaf.autoscaling_config.target_ongoing_requests == 4


# -- from an entry to an Application ---------------------------------------------------------------


def test_overrides_reach_every_node(tmp_path: Path, app_module: str) -> None:
    cfg = parse_config(
        {
            "applications": [
                {
                    "import_path": f"{app_module}:app",
                    "runtime_env": {"env_vars": {"APP": "1", "BOTH": "app"}},
                    "deployments": [
                        {"name": "Leaf", "num_replicas": 3, "user_config": {"k": 1}},
                        {
                            "name": "Leaf_1",
                            "max_ongoing_requests": 2,
                            "ray_actor_options": {
                                "runtime_env": {"env_vars": {"BOTH": "dep"}},
                            },
                        },
                    ],
                }
            ]
        },
        "f.yaml",
    )
    app = build_application(cfg.applications[0], 0, "f.yaml")
    configs = deployments(app)
    assert list(configs) == ["Root", "Leaf", "Leaf_1"]
    assert configs["Root"].max_ongoing_requests == 7  # the code's option stays
    assert (configs["Leaf"].num_replicas, configs["Leaf"].user_config) == (3, {"k": 1})
    assert configs["Leaf_1"].num_replicas == 2  # set in code, not overridden
    assert configs["Leaf_1"].max_ongoing_requests == 2
    env = configs["Leaf_1"].ray_actor_options["runtime_env"]["env_vars"]
    assert env == {"APP": "1", "BOTH": "dep"}
    assert configs["Root"].ray_actor_options["runtime_env"]["env_vars"]["BOTH"] == "app"
    # The shared node stays shared: one Leaf node, reached through args and kwargs.
    assert app.args[0] is app.kwargs["extra"]["nested"][0]


def test_override_of_missing_deployment(app_module: str) -> None:
    cfg = parse_config(
        {"applications": [{"import_path": f"{app_module}:app", "deployments": [{"name": "Nope"}]}]},
        "f.yaml",
    )
    with pytest.raises(ConfigError) as info:
        build_application(cfg.applications[0], 0, "f.yaml")
    message = str(info.value)
    assert message.startswith("f.yaml: applications[0].deployments[0].name: ")
    assert "no deployment 'Nope'" in message and "Root, Leaf, Leaf_1" in message


@pytest.mark.parametrize(
    ("import_path", "reason"),
    [
        ("no_such_module_xyz:app", "no module named 'no_such_module_xyz'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:not_an_app", "not an Application"),
        ("{mod}:Leaf", "is a Deployment"),
    ],
)
def test_import_path_errors(app_module: str, import_path: str, reason: str) -> None:
    path = import_path.format(mod=app_module)
    cfg = parse_config({"applications": [{"import_path": path}]}, "f.yaml")
    with pytest.raises(ConfigError) as info:
        build_application(cfg.applications[0], 0, "f.yaml")
    assert str(info.value).startswith("f.yaml: applications[0].import_path: ")
    assert reason in str(info.value)


def test_module_that_raises_at_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"raising_{next(_ids)}"
    (tmp_path / f"{name}.py").write_text("x = 1\nraise RuntimeError('no model file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = parse_config({"applications": [{"import_path": f"{name}:app"}]}, "f.yaml")
    with pytest.raises(ConfigError) as info:
        build_application(cfg.applications[0], 0, "f.yaml")
    message = str(info.value)
    assert "RuntimeError: no model file" in message and f"{name}.py:2" in message


def test_builders(app_module: str) -> None:
    cfg = parse_config(
        {
            "applications": [
                {
                    "name": "a",
                    "import_path": f"{app_module}:builder",
                    "args": {"tag": "t"},
                    "route_prefix": "/a",
                },
                {
                    "name": "b",
                    "import_path": f"{app_module}.typed_builder",
                    "args": {"replicas": 4},
                    "route_prefix": "/b",
                },
                {
                    "name": "c",
                    "import_path": f"{app_module}:typed_builder",
                    "args": {"replicas": "many"},
                    "route_prefix": "/c",
                },
                {"name": "d", "import_path": f"{app_module}:builder", "route_prefix": "/d"},
            ]
        },
        "f.yaml",
    )
    a = build_application(cfg.applications[0], 0, "f.yaml")
    assert a.args[0].args == ("t",)
    b = build_application(cfg.applications[1], 1, "f.yaml")
    assert b.deployment.config.num_replicas == 4 and b.args == ("typed",)
    with pytest.raises(ConfigError, match=r"applications\[2\]\.args\.replicas: .*'many'"):
        build_application(cfg.applications[2], 2, "f.yaml")
    with pytest.raises(ConfigError, match=r"applications\[3\]\.import_path: .*KeyError"):
        build_application(cfg.applications[3], 3, "f.yaml")


def test_application_config_round_trips(app_module: str) -> None:
    import importlib

    app = importlib.import_module(app_module).app
    entry = application_config(app, "app1", "/", f"{app_module}:app")
    assert entry["deployments"] == [
        {"name": "Root", "max_ongoing_requests": 7},
        {"name": "Leaf", "num_replicas": 2},
        {"name": "Leaf_1", "num_replicas": 2},
    ]
    cfg = parse_config({"applications": [entry]}, "built.yaml")
    rebuilt = build_application(cfg.applications[0], 0, "built.yaml")
    assert deployments(rebuilt) == deployments(app)


def test_source_config_keeps_what_the_file_set() -> None:
    cfg = parse_config(
        {
            "applications": [
                {"import_path": "m:a", "deployments": [{"name": "A", "num_replicas": 2}]}
            ]
        }
    )
    assert source_config(cfg.applications[0]) == {
        "name": "default",
        "route_prefix": "/",
        "import_path": "m:a",
        "deployments": [{"name": "A", "num_replicas": 2}],
    }
