"""The two backends a bench compares, each a fresh database dropped afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from controller.config import Config
from controller.rollout.transitions import create_rollout
from controller.storage.store import Store

DEFAULT_POSTGRES = os.environ.get(
    "CUTOVER_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def fresh_postgres(admin_url: str = DEFAULT_POSTGRES) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of `admin_url`; dropped on exit."""
    name = f"cutover_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def allow_connections(admin_url: str, database_url: str, on: bool) -> None:
    """A database outage and its end: refuse new connections and end the open ones, or let
    them in again."""
    name = make_url(database_url).database
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(on).lower()}'))
            if not on:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"
                    ),
                    {"d": name},
                )
    finally:
        admin.dispose()


@contextmanager
def backends(work: Path, postgres: str = DEFAULT_POSTGRES) -> Iterator[dict[str, str]]:
    """{"sqlite": url, "postgresql": url}, both fresh."""
    with fresh_postgres(postgres) as pg:
        yield {"sqlite": f"sqlite:///{work / 'bench.db'}", "postgresql": pg}


def bench_rollout(url: str, **rollout: object) -> tuple[Store, Config]:
    """A migrated database at `url` holding one rollout, `bench`, of two stand-in models."""
    store = Store(url)
    store.upgrade()
    config = Config.model_validate(
        {
            "name": "bench",
            "database_url": url,
            "models": {"incumbent": {"pipeline": "a/b"}, "candidate": {"pipeline": "c/d"}},
            "rollout": rollout,
        }
    )
    create_rollout(store, config, "bench")
    return store, config
