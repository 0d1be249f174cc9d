"""The routing table: what share of users the candidate serves and how much is mirrored.

Derived from the stored rollout and the config on every read, never kept as
its own state, so the router, the CLI and the controller cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from controller.config import Config
from controller.rollout.state_machine import RolloutView


@dataclass(frozen=True)
class RoutingTable:
    rollout: str
    state: str
    stage: str
    version: int
    candidate_weight: int
    mirror_percent: float

    @property
    def incumbent_weight(self) -> int:
        return 100 - self.candidate_weight

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"incumbent_weight": self.incumbent_weight}


def routing_table(name: str, view: RolloutView, version: int, config: Config) -> RoutingTable:
    mirror = (
        config.rollout.for_stage("mirror_percent", view.stage.name) if view.experimenting else 0.0
    )
    return RoutingTable(
        rollout=name,
        state=view.state.value,
        stage=view.stage.name,
        version=version,
        candidate_weight=view.candidate_weight,
        mirror_percent=float(mirror),
    )
