"""Assembling and starting the Ray Serve application: a ModelServer per model in use, a Router.

`cutover serve` calls `start`; tests call it too, so the code path that
deploys in production is the one under test.
"""

from __future__ import annotations

import math
import os
from typing import Any

import structlog
from sqlalchemy.engine import make_url

from controller.config import Config, ConfigError
from workers.logs import configured_level

log = structlog.get_logger("cutover.app")

ROUTER = "router"
# Ray Serve's access log line per call is off in cutover's deployments: the router's `served`
# event (JSON, with request_id, route, stage, role and statuses) is the access log, and the
# outputs table has every model call's latency. The line cost a model server replica about
# a tenth of its CPU.
NO_ACCESS_LOG = {"enable_access_log": False}
# cutover's replicas run their code on Ray Serve's own event loop, and route handle calls
# on it too, instead of a loop in a second thread each (Ray Serve's defaults). The request
# path then crosses no thread: on 2 cores that took 4 to 5 ms off each request that
# crosses a hop (bench/router_overhead.py). Nothing in cutover blocks a replica's loop:
# SQL and pipelines run in worker threads.
REPLICA_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def build_app(config: Config) -> Any:
    """The application graph: Router({model name: ModelServer}), one deployment per model that a
    route, a fallback or a rollout uses, named after the model in the pool. A model marked
    `in_router` gets no deployment: each router replica serves it in-process, and holds its
    CPUs and GPUs."""
    from controller.serving.router import Router

    data, base_dir = config.to_wire()
    level = configured_level()  # replicas log at the level of the command that deployed them
    servers = {
        name: model_deployment(config, name, level)
        for name in config.models_in_use()
        if not config.models[name].in_router
    }
    cpus, gpus = router_resources(config)
    return Router.options(
        name=ROUTER,
        num_replicas=config.server.replicas,
        ray_actor_options={
            "num_cpus": cpus,
            "num_gpus": gpus,
            "resources": router_custom_resources(config),
            "runtime_env": {"env_vars": REPLICA_ENV},
        },
        max_ongoing_requests=1000,
        logging_config=NO_ACCESS_LOG,
    ).bind(data, base_dir, servers, level)


def model_deployment(config: Config, name: str, level: str | None = None) -> Any:
    """One model of the pool as a ModelServer deployment, named after the model (the router's
    graph binds these; a bake-off runs each as an application of its own)."""
    from workers.model_server import ModelServer

    model = config.models[name]
    _, base_dir = config.to_wire()
    return ModelServer.options(
        name=name,
        num_replicas=model.replicas,
        ray_actor_options={
            "num_cpus": model.num_cpus,
            "num_gpus": model.num_gpus,
            "resources": dict(model.resources),
            "runtime_env": {"env_vars": REPLICA_ENV},
        },
        max_ongoing_requests=max(64, model.max_batch_size * 4),
        logging_config=NO_ACCESS_LOG,
    ).bind(
        name,
        model.model_dump(mode="json"),
        base_dir,
        str(config.log_path),
        level or configured_level(),
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for demos, tests and benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_local_ray(
    num_cpus: int, namespace: str, *, logging_level: str = "WARNING", temp_dir: str | None = None
) -> None:
    """A Ray on this machine: dashboard off, workers' output kept out of the caller's terminal."""
    import ray

    extra = {"_temp_dir": temp_dir} if temp_dir else {}
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        namespace=namespace,
        logging_level=logging_level,
        log_to_driver=False,
        **extra,
    )


def router_resources(config: Config) -> tuple[float, float]:
    """CPUs and GPUs of one router replica: its own, plus those of the models it serves."""
    hosted = [config.models[name] for name in config.models_in_router()]
    return (
        config.server.num_cpus + sum(m.num_cpus for m in hosted),
        sum(m.num_gpus for m in hosted),
    )


def router_custom_resources(config: Config) -> dict[str, float]:
    """A router replica's custom resources: its own, plus those of the models it serves."""
    needed = dict(config.server.resources)
    for name in config.models_in_router():
        for key, amount in config.models[name].resources.items():
            needed[key] = needed.get(key, 0.0) + amount
    return needed


def cpus_needed(config: Config) -> float:
    models = [config.models[name] for name in config.models_in_use()]
    return (
        sum(m.num_cpus * m.replicas for m in models if not m.in_router)
        + router_resources(config)[0] * config.server.replicas
        + config.scorer.num_cpus * config.scorer.actors
    )


def check_remote_safe(config: Config, address: str | None) -> None:
    """A remote cluster cannot reach this machine's SQLite file or local artifact directory
    (an object store, or a directory shared by every node, is fine)."""
    if not address or address in ("local", "auto"):
        return
    problems = []
    if make_url(config.resolved_database_url).get_backend_name() == "sqlite":
        problems.append(
            config.problem(
                ("database_url",),
                "a remote Ray cluster cannot use a SQLite file on this "
                "machine; use PostgreSQL (postgresql+psycopg://…)",
            )
        )
    if config.object_store is None and not os.environ.get("CUTOVER_SHARED_ARTIFACTS"):
        problems.append(
            config.problem(
                ("artifact_dir",),
                "a remote Ray cluster needs images every node can reach: an "
                "`object_store:` (S3-compatible), or shared storage mounted at this path on "
                "every node with CUTOVER_SHARED_ARTIFACTS=1",
            )
        )
    if problems:
        raise ConfigError(problems)


def start(config: Config, address: str | None = None, *, http_port: int | None = None) -> Any:
    """Connect to (or start) Ray, start Serve's HTTP proxy, deploy; return the router handle."""
    import ray
    from ray import serve

    check_remote_safe(config, address)
    config.check_model_paths()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, namespace="cutover", logging_level="WARNING")
        else:
            start_local_ray(max(math.ceil(cpus_needed(config)) + 1, os.cpu_count() or 1), "cutover")
    serve.start(
        proxy_location=config.server.proxy_location,
        http_options={"host": config.server.host, "port": http_port or config.server.port},
    )
    handle = serve.run(build_app(config), name=config.name, route_prefix="/", blocking=False)
    log.info(
        "serving",
        rollout=config.name,
        host=config.server.host,
        port=http_port or config.server.port,
    )
    return handle


def stop() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
