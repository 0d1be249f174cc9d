"""Shared fixtures: a database URL per backend, and a config written to a temp dir.

PostgreSQL tests need CUTOVER_TEST_DATABASE_URL (a server where the user may
create databases). Each test gets a fresh database that is dropped afterwards.
Under CI (CI=true) a missing URL is an error, not a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from controller.config import Config, load_config
from controller.rollout.transitions import create_rollout
from controller.storage.artifact_store import forget
from controller.storage.store import Store
from tests.stall_proxy import StallProxy

PG_ENV = "CUTOVER_TEST_DATABASE_URL"
PG_HINT = (
    f"PostgreSQL tests skipped: set {PG_ENV}=postgresql+psycopg://postgres@127.0.0.1:5432/test "
    "(a user that may CREATE DATABASE) to run them"
)


def postgres_admin_url() -> str | None:
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(
                f"{PG_ENV} is not set under CI; .ci/run must set it so PostgreSQL tests run"
            )
        pytest.skip(PG_HINT)
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    admin = postgres_admin_url()
    name = f"cutover_t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cutover.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


def base_config(db_url: str, **rollout: object) -> dict:
    return {
        "name": "test-rollout",
        "database_url": db_url,
        "models": {
            "incumbent": {"pipeline": "org/incumbent-model"},
            "candidate": {"pipeline": "org/candidate-model"},
        },
        "rollout": {"min_samples": 0, "min_duration": 0, **rollout},
    }


def write_config(directory: Path, data: dict, name: str = "cutover.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def prepare_rollout(path: Path) -> tuple[Config, Store]:
    """Load the config at `path`, migrate its database and create its rollout: where every
    test of a live rollout starts. The caller closes the store."""
    config = load_config(path)
    store = Store(config.resolved_database_url)
    store.upgrade()
    create_rollout(store, config, actor="tester")
    return config, store


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny pipelines with different weights, built once per test session."""
    from workers.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    return {
        role: make_tiny_pipeline(root / role, variant=role) for role in ("incumbent", "candidate")
    }


def image_distance(a, b) -> float:
    """Mean absolute difference of two uint8 images, in pixel values (0..255)."""
    import numpy as np

    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[int]:
    """One local Ray with Serve's HTTP proxy for the whole session (starting one takes ~20 s); yields its port."""
    import ray
    from ray import serve

    from bench.chaos import S3_TEST_CREDENTIALS
    from controller.serving.app import free_port, start_local_ray

    # Replicas inherit Ray's environment: what moto's S3 server needs must be there first.
    for key, value in S3_TEST_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    port = free_port()
    start_local_ray(4, "cutover-tests")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def router_client(port: int, wait_s: float = 120) -> httpx.Client:
    """An HTTP client for the router on `port`, once its /healthz answers (deployments start
    in tens of seconds)."""
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return client


@pytest.fixture
def captured_logs() -> Iterator[list[dict]]:
    """Every structlog event of the test, whatever level another test configured."""
    import logging

    import structlog

    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**saved)


def wait_until(condition, timeout: float = 30.0) -> bool:
    """Poll for a state the code under test reaches by itself (never a fixed sleep)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def add_request(session, rollout_id: int, **fields):
    """A recorded request row of a shadow-stage rollout, flushed so outputs may follow it
    (no ORM relationship orders the inserts). `fields` override the defaults."""
    from controller.storage.tables import Request, utcnow

    request = Request(
        **{
            "id": str(uuid.uuid4()),
            "rollout_id": rollout_id,
            "stage": "shadow",
            "primary_role": "incumbent",
            "sticky_key": "u",
            "prompt": "a fox",
            "params": {},
            "seed": 1,
            "mirrored": False,
            "created_at": utcnow(),
        }
        | fields
    )
    session.add(request)
    session.flush()
    return request


# -- an S3-compatible store: moto's S3 server (MinIO's has no pip or Debian package here) --

MOTO = shutil.which("moto_server")


@pytest.fixture(scope="module")
def s3_server():
    if MOTO is None:
        pytest.fail("moto_server is missing: `make setup` installs the dev extras (moto[server])")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [MOTO, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    assert wait_until(up, 60), "moto_server did not start"
    yield port
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket behind a proxy that can stall; credentials as boto3 reads them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    proxy = StallProxy(("127.0.0.1", s3_server))
    bucket = f"cutover-{uuid.uuid4().hex[:12]}"
    settings = {
        "bucket": bucket,
        "endpoint_url": f"http://127.0.0.1:{proxy.port}",
        "region": "us-east-1",
        "retry_interval": 0.2,
        "timeout": 1,
    }
    import boto3

    boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{s3_server}", region_name="us-east-1"
    ).create_bucket(Bucket=bucket)
    yield settings, proxy
    proxy.close()
    forget()
