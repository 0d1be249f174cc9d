"""Connections to the database and its migrations.

SQLite is the embedded default, PostgreSQL the production store; both run the
same Alembic migrations. SQLite gets WAL and a busy timeout so the router, the
controller loop and operators' CLIs can share one file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).parent
SQLITE_BUSY_TIMEOUT_MS = 30_000


class StoreError(Exception):
    """The database cannot be used as it is; the message says what to run."""


def make_engine(
    url: str,
    *,
    sqlite_busy_ms: int = SQLITE_BUSY_TIMEOUT_MS,
    connect_timeout: int | None = None,
    **kwargs: Any,
) -> Engine:
    """An engine for `url`; creates the directory of a SQLite file.

    `sqlite_busy_ms` is how long a SQLite writer waits for a lock; the recorder
    uses a short one so it spills instead of stalling. `connect_timeout` bounds
    how long a PostgreSQL connection attempt may hang when the server is gone.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": sqlite_busy_ms / 1000}, **kwargs)
        event.listen(engine, "connect", lambda conn, _record: _sqlite_pragmas(conn, sqlite_busy_ms))
        return engine
    connect_args = {"connect_timeout": connect_timeout} if connect_timeout else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, busy_ms: int) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    """An engine plus a session factory; one per process, shared by its threads."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def reader(self) -> Session:
        return self._sessions()

    def upgrade(self, revision: str = "head") -> None:
        _alembic("upgrade", self.engine, revision)

    def downgrade(self, revision: str = "base") -> None:
        _alembic("downgrade", self.engine, revision)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def require_schema(self) -> None:
        """Refuse to run against a database that `cutover init` has not prepared."""
        if "rollouts" not in inspect(self.engine).get_table_names():
            raise StoreError(
                f"the database at {self.safe_url} has no cutover tables; run `cutover init` (or `cutover db upgrade`)"
            )

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()


def _alembic(direction: str, engine: Engine, revision: str) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        getattr(command, direction)(config, revision)
