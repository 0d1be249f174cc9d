"""The router's view of the rollout: re-read from SQL by a background thread, served from memory.

Requests never wait on the database. The table is re-read every
`server.refresh_interval`, so a verb run from any terminal reaches every router
replica within that interval. If the database is unreachable the last table
read stays in force; a router that never read one serves everyone from the
incumbent and mirrors nothing.
"""

from __future__ import annotations

import threading
import time

import structlog
from sqlalchemy.exc import DBAPIError

from controller.config import Config
from controller.rollout.transitions import RolloutNotFound, get_rollout, view_of
from controller.serving.traffic import RoutingTable, routing_table
from controller.storage.store import Store

log = structlog.get_logger("cutover.table_source")


def read_table(store: Store, config: Config) -> RoutingTable:
    with store.reader() as session:
        row = get_rollout(session, config.name)
        return routing_table(row.name, view_of(row), row.version, config)


def safe_default(config: Config) -> RoutingTable:
    return RoutingTable(
        rollout=config.name,
        state="unknown",
        stage="unknown",
        version=0,
        candidate_weight=0,
        mirror_percent=0.0,
    )


class TableSource:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.interval = config.server.refresh_interval
        self.store = Store.for_config(config)
        self.table = safe_default(config)
        self._read_at = time.monotonic()
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="cutover-table-source", daemon=True)
        self._thread.start()

    def age(self) -> float:
        """Seconds since the table was last read successfully."""
        return time.monotonic() - self._read_at

    def refresh(self) -> None:
        try:
            table = read_table(self.store, self.config)
        except (DBAPIError, RolloutNotFound) as exc:
            log.warning(
                "routing_table_stale",
                rollout=self.config.name,
                stage=self.table.stage,
                error=str(exc).splitlines()[0][:200],
            )
            return
        if table != self.table:
            log.info(
                "routing_table_changed",
                rollout=table.rollout,
                stage=table.stage,
                state=table.state,
                candidate_weight=table.candidate_weight,
                mirror_percent=table.mirror_percent,
            )
        self.table = table
        self._read_at = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.store.close()
