"""`cutover.yaml`: the model pool, the routes it serves and their rollouts, validated first.

The playbook shape: `models:` is a named pool; `routes:` says which model serves
each request kind (with an optional fallback); `rollouts:` puts a candidate
model through stages on one route. The older two-model file (`models:
{incumbent, candidate}` and one `rollout:`) stays valid: it is the shorthand
for one `generate` route with one rollout named after the config.

Every error names the file, the line, the key and what would have been
accepted, because the person reading it is mid-release and should not have to
open the source to learn the schema.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    field_validator,
)

from controller.operations.settings import ApprovalConfig, ConsoleConfig, NotificationsConfig
from policies.yaml_source import Problem, SourceError, YamlSource, load_yaml, validate_source
from workers.config import ByteSize, Duration, ModelConfig, ModelKind, Strict
from workers.jobs import OutputStatus

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


def _stage_keys(value: Any) -> Any:
    """Stage names as YAML may write them (`60:` is an int key) become strings."""
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


class Route(StrEnum):
    """The request kinds a product sends, each a route with its own model and rollout.

    `thumbnail` is derived from `generate` (generations its match rule picks);
    `inpaint` is derived from `edit` (edits that carry a mask).
    """

    GENERATE = "generate"
    THUMBNAIL = "thumbnail"
    EDIT = "edit"
    INPAINT = "inpaint"
    UPSCALE = "upscale"


# The model kinds that can serve each route.
ROUTE_KINDS: dict[Route, tuple[ModelKind, ...]] = {
    Route.GENERATE: (ModelKind.TEXT2IMG,),
    Route.THUMBNAIL: (ModelKind.TEXT2IMG,),
    Route.EDIT: (ModelKind.IMG2IMG, ModelKind.INPAINT),
    Route.INPAINT: (ModelKind.INPAINT,),
    Route.UPSCALE: (ModelKind.UPSCALE,),
}
FALLBACK_CAUSES = (
    OutputStatus.TIMEOUT,
    OutputStatus.OOM,
    OutputStatus.ERROR,
    OutputStatus.OVERLOAD,
)
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
SHORTHAND_INCUMBENT, SHORTHAND_CANDIDATE = "incumbent", "candidate"


class MatchRule(Strict):
    """Which generations a derived route (`thumbnail`) takes from `generate`."""

    max_side: int = Field(256, ge=8, description="the longer side of the image, in pixels, at most")

    def matches(self, width: int, height: int) -> bool:
        return max(width, height) <= self.max_side


class RouteConfig(Strict):
    """One request kind: the model serving it, and the model that answers when it cannot."""

    model: str
    fallback: str | None = None
    fallback_after: Duration | None = Field(
        None, description="a deadline: past it the fallback answers instead (needs `fallback`)"
    )
    fallback_on: list[Literal["timeout", "oom", "error", "overload"]] = Field(
        default_factory=lambda: [c.value for c in FALLBACK_CAUSES]
    )
    match: MatchRule | None = None
    suites: list[str] | None = Field(
        None,
        description="suites `cutover validate` runs for this route (shipped names or files "
        "relative to the config); default: every shipped suite with items on the route",
    )


PER_STAGE_FIELDS = ("mirror_percent", "min_samples", "min_duration", "max_duration")


class RolloutConfig(Strict):
    """One rollout: a candidate model taking a route over from the route's model, stage by stage."""

    route: Route = Route.GENERATE
    candidate: str = SHORTHAND_CANDIDATE
    policy: str | None = Field(None, description="policy file; default: the config's `policy`")
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
    # On a route without a fallback, a user the candidate serves gets the incumbent's answer
    # where the candidate fails (per `fallback_on`); the failure is recorded and judged.
    retry_on_incumbent: bool = True
    evaluation_interval: Duration = 30.0
    # The age of the oldest unscored output past which the rollout is held: a verdict must
    # not advance a stage while the probes' evidence is that far behind.
    max_scorer_lag: Duration = Field(300.0, gt=0)
    lease_ttl: Duration = Field(
        30.0, gt=0, description="a controller loop silent this long loses its lease"
    )
    # Stages (by name, or "*" for all) that need an external approval before they advance.
    approval: Annotated[dict[str, ApprovalConfig], BeforeValidator(_stage_keys)] = {}

    def approval_for(self, stage: str) -> ApprovalConfig | None:
        return self.approval.get(stage) or self.approval.get("*")

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
    max_upload_bytes: ByteSize = Field(
        8 * 2**20, description="largest image or mask an edit or upscale may upload"
    )
    request_timeout: Duration = 120.0
    mirror_timeout: Duration = 60.0
    mirror_max_in_flight: int = Field(8, ge=0)
    refresh_interval: Duration = 1.0
    num_cpus: float = Field(0.25, gt=0)
    replicas: int = Field(1, ge=1)
    resources: dict[str, float] = Field(
        {}, description="custom Ray resources each router replica needs (its node)"
    )
    metrics: bool = Field(True, description="Prometheus /metrics on the router")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode",
        description="where Ray Serve runs its HTTP proxies: every node, or the head only "
        "(several Ray nodes on one machine would collide on the port)",
    )


class ScorerConfig(Strict):
    """Where the probes run: a pool of Ray actors with CPUs of their own, off the serving
    replicas and off the controller loop. `actors: 0` runs them inside the loop instead
    (no Ray needed: `cutover control`, tests)."""

    actors: int = Field(1, ge=0)
    num_cpus: float = Field(0.5, gt=0, description="CPUs Ray reserves for each scorer actor")
    placement: Literal["spread", "pack"] = Field(
        "spread", description="spread the actors over nodes, or pack them where Ray likes"
    )
    resources: dict[str, float] = Field(
        {}, description="custom Ray resources each actor needs, to pin scorers to nodes"
    )
    batch: int = Field(8, ge=1, description="outputs one actor claims at a time")
    poll_interval: Duration = Field(0.5, gt=0, description="an idle actor's wait for work")
    claim_ttl: Duration = Field(
        120.0, gt=0, description="a claim not written back by then is taken by another actor"
    )


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


class ObjectStoreConfig(Strict):
    """An S3-compatible bucket for the images. `artifact_dir` is then each node's copy:
    every image is written there first, uploaded, and kept there while the store is down
    (uploaded once it is back), so an outage of the store loses nothing. Credentials come
    from the environment, as boto3 reads them (AWS_ACCESS_KEY_ID, a role, ...)."""

    bucket: str = Field(min_length=3)
    prefix: str = "cutover/"
    endpoint_url: str | None = Field(
        None, description="an S3-compatible server (MinIO, Ceph); none: AWS itself"
    )
    region: str | None = None
    retry_interval: Duration = Field(5.0, gt=0, description="between uploads of held images")
    timeout: Duration = Field(10.0, gt=0, description="one upload or download")


ModelName = Annotated[str, Field(pattern=NAME_PATTERN)]


@dataclass(frozen=True)
class RolloutPlan:
    """One rollout as the controller, router and CLI use it: its names resolved, its settings."""

    name: str
    route: Route
    incumbent: str  # the route's model, which serves everyone the candidate does not
    candidate: str
    settings: RolloutConfig
    policy_path: Path | None  # None: the bundled default policy
    key_path: tuple[str, ...]  # where it is written in the file, for problems

    @property
    def stages(self) -> list[Stage]:
        return self.settings.stage_list

    def for_stage(self, field_name: str, stage: str) -> Any:
        return self.settings.for_stage(field_name, stage)


class Config(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    database_url: str = "sqlite:///.cutover/cutover.db"
    database: DatabaseConfig = DatabaseConfig()
    artifact_dir: str = ".cutover/artifacts"
    object_store: ObjectStoreConfig | None = None
    spill_dir: str = ".cutover/spill"
    log_file: str = ".cutover/logs/events.jsonl"
    models: dict[ModelName, ModelConfig]
    routes: dict[Route, RouteConfig] = {}
    rollouts: dict[ModelName, RolloutConfig] = {}
    rollout: RolloutConfig | None = Field(
        None, description="the two-model shorthand: one rollout on `generate`, named `name`"
    )
    server: ServerConfig = ServerConfig()
    scorer: ScorerConfig = ScorerConfig()
    notifications: NotificationsConfig = NotificationsConfig()
    console: ConsoleConfig = ConsoleConfig()
    policy: str | None = None
    # What one GPU-hour costs you: status and the reports price each model's median image
    # with it (the policy's `cost_per_image` check compares GPU-seconds, where it cancels).
    price_per_gpu_hour: float | None = Field(None, gt=0)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: YamlSource | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path:
        """Directory that relative paths in the config are relative to (the file's own)."""
        return self._base_dir

    @property
    def is_shorthand(self) -> bool:
        """The two-model file: no `routes:`, models `incumbent` (and `candidate`)."""
        return not self.routes

    @property
    def route_map(self) -> dict[Route, RouteConfig]:
        """Every route served; the shorthand serves `generate` from `incumbent`."""
        if self.is_shorthand:
            return {Route.GENERATE: RouteConfig(model=SHORTHAND_INCUMBENT)}
        return dict(self.routes)

    def plans(self) -> dict[str, RolloutPlan]:
        """Every rollout, by name, with its route's model as the incumbent."""
        routes = self.route_map
        written: list[tuple[str, RolloutConfig, tuple[str, ...]]] = [
            (name, settings, ("rollouts", name)) for name, settings in self.rollouts.items()
        ]
        shorthand_rollout = self.rollout is not None or SHORTHAND_CANDIDATE in self.models
        if self.is_shorthand and not self.rollouts and shorthand_rollout:
            written.append((self.name, self.rollout or RolloutConfig(), ("rollout",)))
        plans = {}
        for name, settings, key_path in written:
            route = routes.get(settings.route)
            plans[name] = RolloutPlan(
                name=name,
                route=settings.route,
                incumbent=route.model if route else "",
                candidate=settings.candidate,
                settings=settings,
                policy_path=self.policy_path(settings.policy),
                key_path=key_path,
            )
        return plans

    def policy_path(self, policy: str | None = None) -> Path | None:
        """A policy file (`policy` if given, else the config's `policy`) relative to the
        config's directory; None: the bundled default policy."""
        chosen = policy or self.policy
        return self._base_dir / chosen if chosen else None

    def plan(self, name: str | None = None) -> RolloutPlan:
        """The rollout a verb acts on: the one named, or the only one there is."""
        plans = self.plans()
        if name is None:
            if len(plans) == 1:
                return next(iter(plans.values()))
            if not plans:
                raise ConfigError(
                    [
                        self.problem(
                            ("rollouts",), "this config has no rollout: add one under rollouts:"
                        )
                    ]
                )
            raise ConfigError(
                [
                    self.problem(
                        ("rollouts",),
                        f"this config has {len(plans)} rollouts ({', '.join(plans)}): "
                        "say which with --rollout NAME",
                    )
                ]
            )
        if name not in plans:
            known = ", ".join(plans) or "none"
            raise ConfigError(
                [self.problem(("rollouts",), f"there is no rollout {name!r}; rollouts: {known}")]
            )
        return plans[name]

    def models_in_use(self) -> list[str]:
        """Models a deployment serves: every route's model and fallback, every candidate."""
        names: list[str] = []
        for route in self.route_map.values():
            names += [route.model] + ([route.fallback] if route.fallback else [])
        names += [plan.candidate for plan in self.plans().values()]
        return [n for n in dict.fromkeys(names) if n in self.models]

    def models_in_router(self) -> list[str]:
        """Models in use that each router replica serves itself (`in_router`)."""
        return [n for n in self.models_in_use() if self.models[n].in_router]

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

    def to_wire(self) -> tuple[dict[str, Any], str]:
        """What another process (a Ray replica or actor) needs to rebuild this config: data and
        base dir, made absolute, since that process may run in another working directory."""
        return self.model_dump(mode="json"), str(self._base_dir.resolve())

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
        for name in self.models_in_use():
            message = _pipeline_problem(self.models[name], self._base_dir)
            if message:
                problems.append(self.problem(("models", name, "pipeline"), message))
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
    problems = check_playbook(config) + _check_stage_names(config)
    if problems:
        raise ConfigError(problems)
    if check_paths:
        config.check_model_paths()
    return config


def _check_stage_names(config: Config) -> list[Problem]:
    """Per-stage mappings may only name stages that exist (a typo would silently use the default)."""
    problems = []
    for plan in config.plans().values():
        names = [s.name for s in plan.stages]
        problems += [
            config.problem(
                (*plan.key_path, field_name, key),
                f"there is no stage {key!r}; stages are {', '.join(names)}",
            )
            for field_name in PER_STAGE_FIELDS
            for key in getattr(plan.settings, field_name)
            if key != "*" and key not in names
        ]
    return problems


def check_playbook(config: Config) -> list[Problem]:
    """Every name a route or rollout uses exists, fits the route's kind, and no route has two
    rollouts. Each problem points at the key that is wrong."""
    problems: list[Problem] = []

    def refuse(path: tuple[str, ...], message: str) -> None:
        problems.append(config.problem(path, message))

    models = ", ".join(config.models)
    if config.is_shorthand:
        if SHORTHAND_INCUMBENT not in config.models:
            refuse(
                ("models",),
                "no routes: name the model serving each route under routes: "
                "(e.g. routes: {generate: {model: NAME}}), or use the two-model shorthand "
                "models: {incumbent: ..., candidate: ...}",
            )
        elif config.rollout is not None and SHORTHAND_CANDIDATE not in config.models:
            refuse(
                ("models", SHORTHAND_CANDIDATE),
                "is required: `rollout:` (the two-model shorthand) rolls out "
                "the model named candidate",
            )
            return problems
    elif config.rollout is not None:
        refuse(
            ("rollout",),
            "rollout: is the two-model shorthand; with routes: write each rollout under "
            "rollouts: {NAME: {route: ..., candidate: ...}}",
        )

    def model_fits(path: tuple[str, ...], name: str, route: Route, what: str) -> None:
        if name not in config.models:
            refuse(path, f"there is no model {name!r} in models: ({models})")
            return
        kind = config.models[name].kind
        if kind not in ROUTE_KINDS[route]:
            allowed = " or ".join(k.value for k in ROUTE_KINDS[route])
            refuse(
                path,
                f"{what} {name!r} is of kind {kind.value}; route {route.value} needs {allowed}",
            )

    for route, settings in config.routes.items():
        at = ("routes", route.value)
        model_fits((*at, "model"), settings.model, route, "model")
        if settings.fallback is not None:
            model_fits((*at, "fallback"), settings.fallback, route, "fallback")
            if settings.fallback == settings.model:
                refuse((*at, "fallback"), "the fallback must be another model than the route's own")
            if settings.fallback_after is not None and "timeout" not in settings.fallback_on:
                refuse(
                    (*at, "fallback_on"),
                    "fallback_after cuts the model off at its deadline, which is a timeout: "
                    "add timeout to fallback_on",
                )
        elif settings.fallback_after is not None:
            refuse((*at, "fallback_after"), "fallback_after needs a fallback: model to answer")
        if settings.match is not None and route is not Route.THUMBNAIL:
            refuse((*at, "match"), "only the derived route thumbnail takes a match rule")
    if Route.THUMBNAIL in config.routes and Route.GENERATE not in config.routes:
        refuse(("routes", "thumbnail"), "thumbnail is derived from generate: add a generate route")

    by_route: dict[Route, str] = {}
    for plan in config.plans().values():
        if plan.route not in config.route_map:
            refuse((*plan.key_path, "route"), f"there is no route {plan.route.value!r} in routes:")
            continue
        model_fits((*plan.key_path, "candidate"), plan.candidate, plan.route, "candidate")
        if plan.candidate == plan.incumbent:
            refuse(
                (*plan.key_path, "candidate"),
                f"{plan.candidate!r} already serves route {plan.route.value}; a candidate must be another model",
            )
        if plan.route in by_route:
            refuse(
                (*plan.key_path, "route"),
                f"route {plan.route.value} already has rollout {by_route[plan.route]!r}: "
                "one rollout per route at a time",
            )
        by_route[plan.route] = plan.name
    return problems
