"""Routing tables: per rollout, what share of its route's users the candidate serves and how
much is mirrored.

Derived from the stored rollout and the config on every read, never kept as
its own state, so the router, the CLI and the controller cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from controller.config import RolloutPlan
from controller.rollout.state_machine import RolloutView
from policies.vocabulary import Arm


@dataclass(frozen=True)
class RoutingTable:
    rollout: str
    route: str
    state: str
    stage: str
    version: int
    candidate_weight: int
    mirror_percent: float
    incumbent: str  # model names in the pool
    candidate: str
    retry_on_incumbent: bool = True  # a candidate's failed answer is retried on the incumbent

    @property
    def incumbent_weight(self) -> int:
        return 100 - self.candidate_weight

    def model_of(self, arm: Arm) -> str:
        return self.candidate if arm is Arm.CANDIDATE else self.incumbent

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"incumbent_weight": self.incumbent_weight}


def routing_table(plan: RolloutPlan, view: RolloutView, version: int) -> RoutingTable:
    mirror = plan.for_stage("mirror_percent", view.stage.name) if view.experimenting else 0.0
    return RoutingTable(
        rollout=plan.name,
        route=plan.route.value,
        state=view.state.value,
        stage=view.stage.name,
        version=version,
        candidate_weight=view.candidate_weight,
        mirror_percent=float(mirror),
        incumbent=plan.incumbent,
        candidate=plan.candidate,
        retry_on_incumbent=plan.settings.retry_on_incumbent,
    )


def safe_default(plan: RolloutPlan) -> RoutingTable:
    """Before any table was read: everyone on the incumbent, nothing mirrored."""
    return RoutingTable(
        rollout=plan.name,
        route=plan.route.value,
        state="unknown",
        stage="unknown",
        version=0,
        candidate_weight=0,
        mirror_percent=0.0,
        incumbent=plan.incumbent,
        candidate=plan.candidate,
    )
