"""Which model serves a user, and whether a request is mirrored: pure functions of ids.

The bucket of a user depends only on the rollout name and the sticky key, not
on the stage, so a user on the candidate at 10% stays on it at 30%, and a user
stays on one side for the whole of a stage. Each route has its own rollout, so
a user's side on `edit` is drawn apart from their side on `generate`.
"""

from __future__ import annotations

import hashlib

from controller.serving.traffic import RoutingTable
from policies.vocabulary import Arm

BUCKETS = 10_000


def bucket(rollout: str, key: str, salt: str = "route") -> int:
    digest = hashlib.sha256(f"{salt}:{rollout}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def primary_role(table: RoutingTable, sticky_key: str) -> Arm:
    """The candidate serves the users whose bucket is below its weight."""
    return (
        Arm.CANDIDATE
        if bucket(table.rollout, sticky_key) < table.candidate_weight * BUCKETS // 100
        else Arm.INCUMBENT
    )


def is_mirrored(table: RoutingTable, request_id: str) -> bool:
    """Mirroring is sampled per request (not per user), so every user contributes pairs."""
    return bucket(table.rollout, request_id, salt="mirror") < table.mirror_percent * BUCKETS / 100
