"""The router's view of every rollout: re-read from SQL by a background thread, served from memory.

Requests never wait on the database. The tables are re-read every
`server.refresh_interval`, so a verb run from any terminal reaches every router
replica within that interval. If the database is unreachable the last tables
read stay in force; a router that never read one serves everyone from the
route's own model and mirrors nothing. One rollout missing from the database
(not `init`ed yet) keeps its safe default without holding back the others.
"""

from __future__ import annotations

import threading
import time

import structlog
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from controller.config import Config, Route
from controller.rollout.transitions import view_of
from controller.serving.traffic import RoutingTable, routing_table, safe_default
from controller.storage.store import Store
from controller.storage.tables import Rollout

log = structlog.get_logger("cutover.table_source")


def read_tables(store: Store, config: Config) -> dict[str, RoutingTable]:
    """A table per rollout of the config that the database holds, by rollout name."""
    plans = config.plans()
    with store.reader() as session:
        rows = session.scalars(select(Rollout).where(Rollout.name.in_(list(plans)))).all()
        return {row.name: routing_table(plans[row.name], view_of(row), row.version) for row in rows}


class TableSource:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.interval = config.server.refresh_interval
        self.store = Store.for_config(config)
        self.tables = {name: safe_default(plan) for name, plan in config.plans().items()}
        self.by_route: dict[str, RoutingTable] = {}
        self._index()
        self._read_at = time.monotonic()
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="cutover-table-source", daemon=True)
        self._thread.start()

    def for_route(self, route: Route) -> RoutingTable | None:
        """The table of the rollout on `route`, or None when no rollout runs there."""
        return self.by_route.get(route.value)

    def age(self) -> float:
        """Seconds since the tables were last read successfully."""
        return time.monotonic() - self._read_at

    def refresh(self) -> None:
        try:
            fresh = read_tables(self.store, self.config)
        except DBAPIError as exc:
            log.warning("routing_table_stale", error=str(exc).splitlines()[0][:200])
            return
        for name, table in fresh.items():
            if table != self.tables.get(name):
                log.info(
                    "routing_table_changed",
                    rollout=table.rollout,
                    route=table.route,
                    stage=table.stage,
                    state=table.state,
                    candidate_weight=table.candidate_weight,
                    mirror_percent=table.mirror_percent,
                )
        self.tables = self.tables | fresh
        self._index()
        self._read_at = time.monotonic()

    def _index(self) -> None:
        self.by_route = {table.route: table for table in self.tables.values()}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.store.close()
