"""The scorer: runs the probes on recorded outputs and writes score rows.

Off the response path and off the loop: `scorer_pool.py` runs it in Ray actors with
their own CPUs (the loop runs it itself only when the config asks for no actors). It
claims outputs not scored yet, oldest first, and for each probe's sampled share of
requests computes the typography CER (prompts that quote text), the colour shift of
the pair (candidate against incumbent, same prompt and seed), frame-to-frame drift of
multi-image requests and, when configured, the CLIP score. A probe that fails writes a
score row with its error: a probe error, never a model error. A probe the sampling
left out writes a row that says so (`sampled` false), so what was not scored on
purpose is told apart from what was not scored yet.

Three steps, so the probes (OCR takes a third of a second an image) never run inside
a transaction: claim a batch (one UPDATE; `FOR UPDATE SKIP LOCKED` on PostgreSQL, the
write lock on SQLite, and a lease either way, so scorers never overlap and a dead
one's claims expire), probe with no session open, then write the scores in one short
transaction that only the claim's holder can commit.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import uuid
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from controller.storage.artifact_store import ensure_local
from controller.storage.artifacts import artifact_path
from controller.storage.store import Store
from controller.storage.tables import Output, Request, Score, utcnow
from policies.policy import Policy
from policies.probes.pack import Probe, ProbeContext, probes_for
from policies.probes.typography import ENGINES
from policies.vocabulary import Arm
from workers.images import from_png
from workers.jobs import OutputStatus

log = structlog.get_logger("cutover.scorer")

# How long an output waits for its partner (a mirror still running) before it is scored alone.
PARTNER_WAIT = timedelta(minutes=2)
CLAIM_TTL = timedelta(minutes=2)

ProbeRow = tuple[str, float | None, str | None, bool]  # (probe, value, error, sampled)


def sampled(request_id: str, probe: str, rate: float) -> bool:
    """Whether the probe scores this request: a draw from the request id (a random uuid4),
    the same for both arms so a pair is scored together or not at all, and independent of
    anything either model did, so the sequential tests stay valid on the sampled subset."""
    if rate >= 1.0:
        return True
    digest = hashlib.sha256(f"sample:{probe}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def default_holder(kind: str = "scorer") -> str:
    return f"{kind}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def claim(
    store: Store,
    holder: str,
    rollout_ids: list[int],
    limit: int,
    now: datetime,
    ttl: timedelta = CLAIM_TTL,
) -> dict[int, list[str]]:
    """Take up to `limit` unscored outputs of these rollouts, oldest first: {rollout: ids}.

    One UPDATE whose subquery skips rows another scorer holds (PostgreSQL's SKIP LOCKED)
    and whose lease (`claim_expires`) keeps them taken after the transaction: a claim that
    is not written back in time (its scorer died) is taken by the next scorer to ask.
    """
    free = (
        select(Output.id)
        .join(Request, Output.request_id == Request.id)
        .where(
            Request.rollout_id.in_(rollout_ids),
            Output.scored_at.is_(None),
            or_(Output.claim_expires.is_(None), Output.claim_expires < now),
        )
        .order_by(Output.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True, of=Output)
    )
    with store.session() as session:
        taken = session.scalars(
            update(Output)
            .where(Output.id.in_(free.scalar_subquery()))
            .values(claimed_by=holder, claim_expires=now + ttl)
            .returning(Output.id)
        ).all()
        if not taken:
            return {}
        rows = session.execute(
            select(Output.id, Request.rollout_id)
            .join(Request, Output.request_id == Request.id)
            .where(Output.id.in_(taken))
        ).all()
    claimed: dict[int, list[str]] = {}
    for output_id, rollout_id in rows:
        claimed.setdefault(rollout_id, []).append(output_id)
    return claimed


class Scorer:
    """The probes of one rollout's policy, run on outputs this scorer has claimed."""

    def __init__(self, policy: Policy, artifact_dir: Path, holder: str | None = None) -> None:
        self.policy = policy
        self.artifact_dir = artifact_dir
        self.holder = holder or default_holder()
        self._clip_skip_logged = False
        # The probe pack's opt-in probes run where a check names their metric.
        self.wanted = {check.metric for check in policy.checks}

    @cached_property
    def ocr(self) -> Any:
        return ENGINES[self.policy.ocr_engine]()

    @cached_property
    def clip(self) -> Any:
        if not self.policy.clip_model:
            return None
        from policies.probes.clip_score import ClipScorer

        return ClipScorer(self.policy.clip_model)

    def score_pending(
        self, store: Store, rollout_id: int, limit: int = 64, now: datetime | None = None
    ) -> int:
        """Claim and score up to `limit` outputs of the rollout; returns how many were settled."""
        now = now or utcnow()
        claimed = claim(store, self.holder, [rollout_id], limit, now)
        return self.score(store, claimed.get(rollout_id, []), now)

    def score(self, store: Store, output_ids: list[str], now: datetime | None = None) -> int:
        """Probe outputs this scorer claimed and write their scores; returns how many settled.

        A candidate whose incumbent is not recorded yet is handed back (claim released) until
        PARTNER_WAIT has passed, then scored alone.
        """
        now = now or utcnow()
        if not output_ids:
            return 0
        if self.clip is None and not self._clip_skip_logged:
            log.info("probe_skipped", probe="clip_score", reason="no clip_model in the policy")
            self._clip_skip_logged = True
        with store.reader() as session:
            rows = session.execute(
                select(Output, Request)
                .join(Request, Output.request_id == Request.id)
                .where(Output.id.in_(output_ids))
                .order_by(Output.created_at)
            ).all()
            siblings = _ok_outputs_by_request(session, {request.id for _, request in rows})
        settled: dict[str, list[ProbeRow]] = {}
        for output, request in rows:
            if output.status != OutputStatus.OK:
                settled[output.id] = []
                continue
            partners = partners_of(output, siblings.get(output.request_id, []))
            waiting = output.role == Arm.CANDIDATE and Arm.INCUMBENT not in partners
            if waiting and now - output.created_at < PARTNER_WAIT:
                continue  # the incumbent's side of this pair is not recorded yet
            settled[output.id] = self._probe(output, request, partners)
        return self._write(store, output_ids, settled, now)

    def _write(
        self,
        store: Store,
        claimed: list[str],
        settled: dict[str, list[ProbeRow]],
        now: datetime,
    ) -> int:
        """Scores and `scored_at` in one transaction, for outputs this scorer still holds;
        the rest of the claim is handed back. An output whose claim expired and was taken
        by another scorer keeps that scorer's rows: it is never scored twice."""
        written = 0
        with store.session() as session:
            # A row already there (written before `scored_at` existed) is kept, not doubled.
            have = set(
                session.execute(
                    select(Score.output_id, Score.probe).where(Score.output_id.in_(list(settled)))
                ).all()
            )
            for output_id, results in settled.items():
                mine = session.execute(
                    update(Output)
                    .where(
                        Output.id == output_id,
                        Output.scored_at.is_(None),
                        Output.claimed_by == self.holder,
                    )
                    .values(scored_at=now, claimed_by=None, claim_expires=None)
                ).rowcount
                if not mine:
                    continue
                session.add_all(
                    Score(
                        output_id=output_id,
                        probe=probe,
                        value=value,
                        error=error,
                        sampled=is_sampled,
                        created_at=now,
                    )
                    for probe, value, error, is_sampled in results
                    if (output_id, probe) not in have
                )
                written += 1
            waiting = [i for i in claimed if i not in settled]
            if waiting:
                session.execute(
                    update(Output)
                    .where(Output.id.in_(waiting), Output.claimed_by == self.holder)
                    .values(claimed_by=None, claim_expires=None)
                )
        return written

    def _probe(
        self, output: Output, request: Request, partners: dict[str, Output]
    ) -> list[ProbeRow]:
        incumbent = partners.get(Arm.INCUMBENT) if output.role == Arm.CANDIDATE else None
        context = ProbeContext(
            prompt=request.prompt,
            route=request.route,
            ocr=lambda: self.ocr,
            partner=(lambda: self._partner(incumbent)) if incumbent is not None else None,
            previous=(lambda: self._partner(partners["previous"]))
            if "previous" in partners
            else None,
            clip=self.clip,
        )
        probes = probes_for(context, self.wanted)
        results: list[ProbeRow] = []
        chosen = {}
        for name, probe in probes.items():
            if sampled(request.id, name, self.policy.rate_for(name)):
                chosen[name] = probe
            else:
                results.append((name, None, None, False))
        if not chosen:
            return results
        image = self._image(output)
        if image is None:
            missing = f"artifact {output.artifact_sha256} not found in {self.artifact_dir}"
            return results + [(name, None, missing, True) for name in chosen]
        probed = run_probes(
            chosen, image, request_id=request.id, stage=request.stage, role=output.role
        )
        results += [(name, value, error, True) for name, value, error in probed]
        return results

    def _partner(self, other: Output) -> np.ndarray:
        partner = self._image(other)
        if partner is None:
            raise FileNotFoundError(
                f"artifact {other.artifact_sha256} of the partner output is missing"
            )
        return partner

    def _image(self, output: Output) -> np.ndarray | None:
        if not output.artifact_sha256:
            return None
        path = ensure_local(artifact_path(self.artifact_dir, output.artifact_sha256))
        return from_png(path.read_bytes()) if path is not None else None


def run_probes(
    probes: dict[str, Probe], image: np.ndarray, **log_keys: Any
) -> list[tuple[str, float | None, str | None]]:
    """Each probe on the image, as (probe, value, error); a probe that gives no value (no text
    to read) gives no row. A probe's failure, or a value that is not a finite number, is
    recorded as the probe's error, never as a model error and never as a score."""
    results: list[tuple[str, float | None, str | None]] = []
    for name, probe in probes.items():
        try:
            value = probe(image)
            if value is not None and not math.isfinite(float(value)):
                # A probe's bug must never reach a statistic: an error, not a score.
                raise ValueError(f"the probe returned {value}, not a finite number")
        except Exception as exc:
            log.warning("probe_failed", probe=name, error=str(exc), **log_keys)
            results.append((name, None, f"{type(exc).__name__}: {exc}"[:1000]))
            continue
        if value is not None:
            results.append((name, float(value), None))
    return results


def _ok_outputs_by_request(session: Session, request_ids: set[str]) -> dict[str, list[Output]]:
    """Every ok output of these requests, in one query (the probes' partners come from here)."""
    found: dict[str, list[Output]] = {}
    if request_ids:
        for other in session.scalars(
            select(Output).where(
                Output.request_id.in_(request_ids), Output.status == OutputStatus.OK
            )
        ):
            found.setdefault(other.request_id, []).append(other)
    return found


def partners_of(output: Output, siblings: list[Output]) -> dict[str, Output]:
    """What the probes compare `output` against: the other role's image of the same index
    ("incumbent" / "candidate"), and this role's previous image of the request ("previous")."""
    found = {}
    for other in siblings:
        if other.id == output.id:
            continue
        if other.image_index == output.image_index:
            found[other.role] = other
        elif other.role == output.role and other.image_index == output.image_index - 1:
            found["previous"] = other
    return found
