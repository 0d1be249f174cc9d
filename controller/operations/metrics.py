"""Prometheus metrics: the router's own (per replica, in memory) and the rollouts' (read
from the database at each scrape, so any console or loop process serves the same truth).

Labels are bounded by the config: route, model, arm/role, stage, status, rollout,
check, receiver. No request id, prompt or user ever becomes a label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import select

from controller.config import Config
from controller.operations.dispatcher import delivery_summary
from controller.operations.settings import NotificationsConfig
from controller.rollout.lag import scorer_lag
from controller.rollout.transitions import latest_verdict, view_of
from controller.storage.store import Store
from controller.storage.tables import Rollout, utcnow

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class RouterMetrics:
    """One router replica's series. Prometheus scrapes each replica (Ray Serve spreads
    `/metrics` over replicas; scrape the replicas' pods, or run one replica per pod)."""

    def __init__(self, recorder: Any, mirrors: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cutover_requests",
            "Requests answered, by route, serving arm, stage and HTTP status code.",
            ["route", "arm", "stage", "code"],
            registry=r,
        )
        self.bad_requests = Counter(
            "cutover_bad_requests",
            "Requests refused before any model saw them (4xx), by endpoint and status code.",
            ["endpoint", "code"],
            registry=r,
        )
        self.outputs = Counter(
            "cutover_outputs",
            "Images the models returned, by route, model, role, stage and output status.",
            ["route", "model", "role", "stage", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "cutover_output_latency_seconds",
            "One model call's latency as the router saw it.",
            ["route", "model", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "cutover_request_latency_seconds",
            "A request's whole time in the router, fallback included.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "cutover_batch_size",
            "The batch each image was sampled in.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.oom_splits = Counter(
            "cutover_oom_splits",
            "Batches split in two after CUDA out of memory, per model.",
            ["model"],
            registry=r,
        )
        self.mirrors = Counter(
            "cutover_mirrors",
            "Mirrors started, or skipped because too many were in flight.",
            ["route", "outcome"],
            registry=r,
        )
        self.fallbacks = Counter(
            "cutover_fallbacks",
            "Requests (some of) whose images the route's fallback model answered, by cause.",
            ["route", "model", "cause"],
            registry=r,
        )
        self.in_flight = Gauge(
            "cutover_requests_in_flight", "Requests in the router now.", registry=r
        )
        self.mirrors_in_flight = Gauge(
            "cutover_mirrors_in_flight", "Mirrors in flight now.", registry=r
        )
        self.mirrors_in_flight.set_function(lambda: mirrors.mirrors_in_flight)
        self.registry.register(_RecorderCollector(recorder))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RecorderCollector(Collector):
    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Any]:
        counters = self.recorder.counters
        depth = GaugeMetricFamily(
            "cutover_recorder_queue_depth", "Records waiting for the recorder's writer."
        )
        depth.add_metric([], self.recorder.queue_depth)
        yield depth
        family = GaugeMetricFamily(
            "cutover_recorder_records",
            "The recorder's running counts since the replica started, by what happened.",
            labels=["outcome"],
        )
        for outcome in ("recorded", "spilled", "replayed", "dead_letters", "queue_full"):
            family.add_metric([outcome], getattr(counters, outcome))
        yield family


class RolloutCollector(Collector):
    """Each rollout's state, stage and weight, its latest verdict per check with bounds,
    its scorer lag, and the notification queues, read from the database per scrape."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store

    def collect(self) -> Iterator[Any]:
        now = utcnow()
        state = GaugeMetricFamily(
            "cutover_rollout_state",
            "1 for the rollout's current state.",
            labels=["rollout", "state"],
        )
        stage = GaugeMetricFamily(
            "cutover_rollout_stage_index",
            "The stage the rollout is in (0 = first).",
            labels=["rollout", "stage"],
        )
        weight = GaugeMetricFamily(
            "cutover_rollout_candidate_weight",
            "Percent of users the candidate serves.",
            labels=["rollout"],
        )
        lag = GaugeMetricFamily(
            "cutover_scorer_lag_seconds",
            "Age of the rollout's oldest unscored output (0 when caught up).",
            labels=["rollout"],
        )
        verdict = GaugeMetricFamily(
            "cutover_check_verdict",
            "1 for each check's latest decision in the current stage.",
            labels=["rollout", "check", "decision"],
        )
        values = {
            part: GaugeMetricFamily(
                f"cutover_check_{part}",
                f"Each check's latest {part} (candidate against incumbent).",
                labels=["rollout", "check"],
            )
            for part in ("estimate", "lower", "upper")
        }
        with self.store.reader() as session:
            for row in session.scalars(select(Rollout).order_by(Rollout.name)):
                view = view_of(row)
                state.add_metric([row.name, view.state.value], 1)
                stage.add_metric([row.name, view.stage.name], row.stage_index)
                weight.add_metric([row.name], view.candidate_weight)
                lag.add_metric([row.name], scorer_lag(session, row.id, now) or 0.0)
                latest = latest_verdict(session, row)
                for check in latest.checks if latest else []:
                    verdict.add_metric([row.name, check["name"], check["decision"]], 1)
                    for part, family in values.items():
                        value = check.get(part)
                        if isinstance(value, int | float):
                            family.add_metric([row.name, check["name"]], float(value))
        yield from (state, stage, weight, lag, verdict, *values.values())
        yield from _notification_families(self.store, self.config.notifications)


def _notification_families(store: Store, settings: NotificationsConfig) -> Iterator[Any]:
    pending = GaugeMetricFamily(
        "cutover_notifications_pending", "Deliveries not made yet.", labels=["receiver"]
    )
    delivered = GaugeMetricFamily(
        "cutover_notifications_delivered", "Deliveries made.", labels=["receiver"]
    )
    for row in delivery_summary(store, settings):
        pending.add_metric([row["receiver"]], row["pending"])
        delivered.add_metric([row["receiver"]], row["delivered"])
    yield pending
    yield delivered


def rollout_registry(config: Config, store: Store) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RolloutCollector(config, store))
    return registry
