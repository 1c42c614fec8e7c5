"""``LoggingConfig``: how serval's processes log (Ray Serve's ``ray.serve.schema.LoggingConfig``).

Accepted by ``@serve.deployment`` (a deployment's replicas), ``serve.run`` (an application's
deployments that set none), ``serve.start`` (the controller and the proxy) and config files
(top level, application, deployment), as a ``LoggingConfig`` or a dict of its fields.
"""

from __future__ import annotations

import logging
import os
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["EncodingType", "LoggingConfig", "logging_config_dict"]

# The attributes every ``logging.LogRecord`` has, which ``additional_log_standard_attrs`` may
# name (https://docs.python.org/3/library/logging.html#logrecord-attributes).
LOGRECORD_STANDARD_ATTRS = frozenset(
    {
        "args",
        "asctime",
        "created",
        "exc_info",
        "exc_text",
        "filename",
        "funcName",
        "levelname",
        "levelno",
        "lineno",
        "message",
        "module",
        "msecs",
        "msg",
        "name",
        "pathname",
        "process",
        "processName",
        "relativeCreated",
        "stack_info",
        "taskName",
        "thread",
        "threadName",
    }
)


class EncodingType(StrEnum):
    """How a log line is written: plain text, or one JSON object a line."""

    TEXT = "TEXT"
    JSON = "JSON"


def _default_encoding() -> str:
    # Ray Serve's environment variable for the default, honoured as its users set it.
    return os.environ.get("RAY_SERVE_LOG_ENCODING", "TEXT").upper()


class LoggingConfig(BaseModel):
    """Logging of serval's processes: ``encoding`` (``"TEXT"`` or ``"JSON"``), ``log_level``,
    ``logs_dir`` (None: the cluster's log directory), ``enable_access_log`` (a line per
    request) and ``additional_log_standard_attrs`` (``LogRecord`` attributes added to every
    line, e.g. ``["name", "funcName"]``)."""

    model_config = ConfigDict(extra="forbid")

    encoding: str | EncodingType = Field(default_factory=_default_encoding)
    log_level: int | str = "INFO"
    logs_dir: str | None = None
    enable_access_log: bool = True
    additional_log_standard_attrs: list[str] = Field(default_factory=list)

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, value: str | EncodingType) -> str:
        text = value.value if isinstance(value, EncodingType) else value
        if text not in (EncodingType.TEXT.value, EncodingType.JSON.value):
            raise ValueError(f"encoding must be 'TEXT' or 'JSON', got {value!r}")
        return text

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: int | str) -> str:
        names = {k: v for k, v in logging.getLevelNamesMapping().items() if k != "WARN"}
        if isinstance(value, int) and not isinstance(value, bool):
            for name, level in names.items():
                if level == value:
                    return name
            raise ValueError(f"log_level must be one of {sorted(set(names.values()))}, got {value}")
        if isinstance(value, str) and value.upper() in names:
            return value.upper()
        raise ValueError(f"log_level must be one of {list(names)}, got {value!r}")

    @field_validator("additional_log_standard_attrs")
    @classmethod
    def _attrs(cls, value: list[str]) -> list[str]:
        unknown = [a for a in value if a not in LOGRECORD_STANDARD_ATTRS]
        if unknown:
            raise ValueError(
                f"unknown LogRecord attribute(s) {unknown}: must be among "
                f"{sorted(LOGRECORD_STANDARD_ATTRS)}"
            )
        return list(dict.fromkeys(value))

    @property
    def level(self) -> int:
        """``log_level`` as the number ``logging`` uses."""
        return logging.getLevelNamesMapping()[str(self.log_level)]


def logging_config_dict(value: Any, what: str = "logging_config") -> dict[str, Any] | None:
    """``value`` (a ``LoggingConfig``, a dict of its fields, or None) checked, as the plain
    dict the controller keeps (it holds no user classes); ValueError says what is wrong."""
    if value is None:
        return None
    if isinstance(value, LoggingConfig):
        return value.model_dump(mode="json")
    if not isinstance(value, dict):
        dump = getattr(value, "model_dump", None)  # Ray's own LoggingConfig, say
        if not callable(dump):
            raise TypeError(f"{what} must be a LoggingConfig or a dict, got {value!r}")
        value = dump(mode="json")
    try:
        return LoggingConfig(**value).model_dump(mode="json")
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors(include_url=False)
        ]
        raise ValueError(f"invalid {what}: {'; '.join(problems)}") from None
