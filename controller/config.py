"""`cutover.yaml`: one rollout, validated before anything acts on it.

Every error names the file, the line, the key and what would have been
accepted, because the person reading it is mid-release and should not have to
open the source to learn the schema.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    field_validator,
)

from policies.yaml_source import Problem, SourceError, YamlSource, load_yaml, validate_source
from workers.config import Duration, ModelConfig, Strict

DEFAULT_STAGES: tuple[str | int, ...] = ("shadow", 10, 30, 60, 100)
SHADOW = "shadow"
ENV_CONFIG = "CUTOVER_CONFIG"

ConfigError = SourceError

@dataclass(frozen=True)
class Stage:
    """A rollout stage: its name as written in config and the candidate's traffic share."""

    name: str
    weight: int

    @property
    def is_shadow(self) -> bool:
        return self.weight == 0


def parse_stages(raw: list[str | int]) -> list[Stage]:
    """Stages as written (`shadow`, then increasing percents ending at 100)."""
    stages: list[Stage] = []
    for index, item in enumerate(raw):
        if item == SHADOW:
            if index != 0:
                raise ValueError(f"'shadow' may only be the first stage, found at position {index}")
            stages.append(Stage(SHADOW, 0))
            continue
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(
                f"stage {index} is {item!r}: a stage is 'shadow' or a whole percent 1..100"
            )
        if not 1 <= item <= 100:
            raise ValueError(f"stage {index} is {item}%: a percent must be between 1 and 100")
        if stages and item <= stages[-1].weight:
            raise ValueError(
                f"stage {index} ({item}%) is not above the stage before it ({stages[-1].weight}%): "
                "stages must increase"
            )
        stages.append(Stage(str(item), item))
    if len(stages) < 2:
        raise ValueError("a rollout needs at least two stages, for example [shadow, 100]")
    if stages[-1].weight != 100:
        raise ValueError(
            f"the last stage is {stages[-1].weight}%: it must be 100 so the candidate can be promoted"
        )
    return stages


def _per_stage(value: Any) -> Any:
    """A scalar applies to every stage; a mapping sets stages by name (`shadow`, `10`, …)."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    return {"*": value}


class Models(Strict):
    incumbent: ModelConfig
    candidate: ModelConfig


PER_STAGE_FIELDS = ("mirror_percent", "min_samples", "min_duration", "max_duration")


class RolloutConfig(Strict):
    stages: list[str | int] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    mirror_percent: Annotated[
        dict[str, Annotated[float, Field(ge=0, le=100)]], BeforeValidator(_per_stage)
    ] = {"*": 100.0}
    min_samples: Annotated[dict[str, Annotated[int, Field(ge=0)]], BeforeValidator(_per_stage)] = {
        "*": 100
    }
    min_duration: Annotated[dict[str, Duration], BeforeValidator(_per_stage)] = {"*": 0.0}
    max_duration: Annotated[dict[str, Duration], BeforeValidator(_per_stage)] = {"*": 86400.0}
    auto_advance: bool = False
    evaluation_interval: Duration = 30.0
    lease_ttl: Duration = Field(
        30.0, gt=0, description="a controller loop silent this long loses its lease"
    )

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[str | int]) -> list[str | int]:
        parse_stages(value)
        return value

    @property
    def stage_list(self) -> list[Stage]:
        return parse_stages(self.stages)

    def for_stage(self, field_name: str, stage: str) -> Any:
        """The value of a per-stage setting in `stage`, falling back to the all-stages value."""
        values: dict[str, Any] = getattr(self, field_name)
        if stage in values:
            return values[stage]
        if "*" in values:
            return values["*"]
        return type(self).model_fields[field_name].default["*"]


class ServerConfig(Strict):
    """The HTTP front door: limits that make a bad request a 4xx, and mirroring bounds."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_prompt_chars: int = Field(1000, ge=1)
    min_size: int = Field(64, ge=8)
    max_size: int = Field(1024, ge=8)
    max_n: int = Field(4, ge=1)
    max_steps: int = Field(150, ge=1)
    default_size: str = "64x64"
    request_timeout: Duration = 120.0
    mirror_timeout: Duration = 60.0
    mirror_max_in_flight: int = Field(8, ge=0)
    refresh_interval: Duration = 1.0
    num_cpus: float = Field(0.25, gt=0)
    replicas: int = Field(1, ge=1)


class DatabaseConfig(Strict):
    """How long any database call may take before it counts as an outage.

    Without these a database that stalls without refusing connections (a network
    partition) hangs every caller: the recorder would hold records in memory instead of
    spilling them to disk.
    """

    connect_timeout: Duration = Field(3.0, description="opening a connection (PostgreSQL)")
    statement_timeout: Duration = Field(30.0, description="one statement, enforced by the server")
    pool_timeout: Duration = Field(10.0, description="waiting for a pooled connection")
    write_timeout: Duration = Field(
        5.0,
        description="one recorder transaction, enforced by the client: past it the batch spills",
    )
    sqlite_busy_timeout: Duration = Field(
        30.0, description="a SQLite writer waiting for the lock (the recorder uses 2 s)"
    )


class Config(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    database_url: str = "sqlite:///.cutover/cutover.db"
    database: DatabaseConfig = DatabaseConfig()
    artifact_dir: str = ".cutover/artifacts"
    spill_dir: str = ".cutover/spill"
    log_file: str = ".cutover/logs/events.jsonl"
    models: Models
    rollout: RolloutConfig = RolloutConfig()
    server: ServerConfig = ServerConfig()
    policy: str | None = None

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: YamlSource | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path:
        """Directory that relative paths in the config are relative to (the file's own)."""
        return self._base_dir

    @property
    def stages(self) -> list[Stage]:
        return self.rollout.stage_list

    @property
    def resolved_database_url(self) -> str:
        """The URL with a relative SQLite path anchored at the config file's directory."""
        prefix = "sqlite:///"
        url = self.database_url
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self._base_dir / url[len(prefix) :])
        return url

    @property
    def artifact_path(self) -> Path:
        return (self._base_dir / Path(self.artifact_dir).expanduser()).resolve()

    @property
    def log_path(self) -> Path:
        """Where every serving process appends its events (`cutover serve` follows it)."""
        return (self._base_dir / Path(self.log_file).expanduser()).resolve()

    @property
    def spill_path(self) -> Path:
        return (self._base_dir / Path(self.spill_dir).expanduser()).resolve()

    @property
    def policy_path(self) -> Path | None:
        """The policy file, relative to the config; None means the bundled default policy."""
        return self._base_dir / self.policy if self.policy else None

    def to_wire(self) -> tuple[dict[str, Any], str]:
        """What another process (a Ray replica) needs to rebuild this config: data and base dir."""
        return self.model_dump(mode="json"), str(self._base_dir)

    @classmethod
    def from_wire(cls, data: dict[str, Any], base_dir: str) -> Config:
        config = cls.model_validate(data)
        config._base_dir = Path(base_dir)
        return config

    def problem(self, path: tuple[str, ...], message: str) -> Problem:
        """A problem located in this config's file, for checks made after loading."""
        if self._source is None:
            return Problem("(config)", 0, ".".join(path), message)
        return self._source.problem(path, message)

    def check_model_paths(self) -> None:
        """Refuse early, before Ray starts, a pipeline that is neither a local directory nor a hub id.

        Relative paths are relative to the config file, never to the current directory: a
        bare `models/x` that exists only in the current directory would otherwise be sent to
        the hub as a model id, or loaded from the wrong place.
        """
        problems = []
        for role in ("incumbent", "candidate"):
            model: ModelConfig = getattr(self.models, role)
            message = _pipeline_problem(model, self._base_dir)
            if message:
                problems.append(self.problem(("models", role, "pipeline"), message))
        if problems:
            raise ConfigError(problems)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


def _pipeline_problem(model: ModelConfig, base_dir: Path) -> str | None:
    text, resolved = model.pipeline, model.pipeline_path(base_dir)
    if model.is_local(base_dir):
        if resolved.is_dir():
            return None
        return (
            f"{text!r} is not a directory (resolved to {resolved}); build a tiny one with "
            "`cutover models make-tiny DIR` or give a hub id (org/name)"
        )
    if (Path.cwd() / text).is_dir():
        return (
            f"{text!r} is not next to the config ({base_dir}) but is a directory in the current "
            f"one; paths are relative to the config file: write {str((Path.cwd() / text).resolve())!r} "
            "or a path relative to the config, starting with ./"
        )
    if not HUB_ID.match(text):
        return (
            f"{text!r} is neither a directory next to the config ({resolved}) nor a hub id "
            "(org/name); local paths are relative to the config file"
        )
    return None


def find_config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """`-c PATH`, else $CUTOVER_CONFIG, else ./cutover.yaml."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    default = Path("cutover.yaml")
    if default.exists():
        return default
    raise ConfigError(
        [
            Problem(
                "cutover.yaml",
                0,
                "(file)",
                "no config found: pass -c PATH, set CUTOVER_CONFIG, or create ./cutover.yaml "
                "(examples/cutover.yaml is a working start)",
            )
        ]
    )


def load_config(path: str | os.PathLike[str], *, check_paths: bool = False) -> Config:
    """Load and validate a config file; raise ConfigError listing every problem."""
    file = Path(path)
    source = load_yaml(file)
    config = validate_source(
        source, Config, empty_hint="a config needs at least `name` and `models`"
    )
    config._base_dir = file.resolve().parent
    config._source = source
    _check_stage_names(config)
    if check_paths:
        config.check_model_paths()
    return config


def _check_stage_names(config: Config) -> None:
    """Per-stage mappings may only name stages that exist (a typo would silently use the default)."""
    names = [s.name for s in config.stages]
    problems = [
        config.problem(
            ("rollout", field_name, key),
            f"there is no stage {key!r}; stages are {', '.join(names)}",
        )
        for field_name in PER_STAGE_FIELDS
        for key in getattr(config.rollout, field_name)
        if key != "*" and key not in names
    ]
    if problems:
        raise ConfigError(problems)
