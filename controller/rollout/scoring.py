"""The scorer: runs the probes on recorded outputs and writes score rows.

A worker of the controller loop, off the response path. It takes outputs not
scored yet, oldest first, and for a sampled share of them computes the
typography CER (prompts that quote text), the colour shift of the pair
(candidate against incumbent, same prompt and seed), frame-to-frame drift of
multi-image requests and, when configured, the CLIP score. A probe that fails
writes a score row with its error: a probe error, never a model error.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from controller.storage.artifacts import artifact_path
from controller.storage.store import Store
from controller.storage.tables import Output, Request, Score, utcnow
from policies.policy import Policy
from policies.probes.colour import colour_shift
from policies.probes.typography import ENGINES, typography_cer
from policies.vocabulary import Arm
from workers.images import from_png
from workers.jobs import OutputStatus

log = structlog.get_logger("cutover.scorer")

# How long an output waits for its partner (a mirror still running) before it is scored alone.
PARTNER_WAIT = timedelta(minutes=2)


def sampled(output_id: str, rate: float) -> bool:
    digest = hashlib.sha256(f"score:{output_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


class Scorer:
    def __init__(self, policy: Policy, artifact_dir: Path) -> None:
        self.policy = policy
        self.artifact_dir = artifact_dir
        self._clip_skip_logged = False

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
        """Score up to `limit` outputs of the rollout; returns how many were settled.

        Three steps, so the probes (OCR takes a third of a second an image) never run inside a
        transaction: read the outputs, probe them with no session open, then write the scores
        in one short transaction. On SQLite that write is the only moment the scorer holds the
        write lock, so the recorder's inserts are never starved by scoring.
        """
        now = now or utcnow()
        if self.clip is None and not self._clip_skip_logged:
            log.info("probe_skipped", probe="clip_score", reason="no clip_model in the policy")
            self._clip_skip_logged = True
        with store.reader() as session:
            rows = session.execute(
                select(Output, Request)
                .join(Request, Output.request_id == Request.id)
                .where(Request.rollout_id == rollout_id, Output.scored_at.is_(None))
                .order_by(Output.created_at)
                .limit(limit)
            ).all()
            siblings = _ok_outputs_by_request(session, {request.id for _, request in rows})
        settled: dict[str, list[tuple[str, Any, Any]]] = {}
        for output, request in rows:
            if output.status != OutputStatus.OK or not sampled(output.id, self.policy.sample_rate):
                settled[output.id] = []
                continue
            partners = partners_of(output, siblings.get(output.request_id, []))
            waiting = output.role == Arm.CANDIDATE and Arm.INCUMBENT not in partners
            if waiting and now - output.created_at < PARTNER_WAIT:
                continue  # the incumbent's side of this pair is not recorded yet
            settled[output.id] = self._probe(output, request, partners)
        return self._write(store, settled, now)

    @staticmethod
    def _write(store: Store, settled: dict[str, list[tuple[str, Any, Any]]], now: datetime) -> int:
        """Scores and `scored_at` in one transaction. An output another scorer settled
        meanwhile keeps that scorer's rows: it is never scored twice."""
        written = 0
        with store.session() as session:
            for output_id, results in settled.items():
                claimed = session.execute(
                    update(Output)
                    .where(Output.id == output_id, Output.scored_at.is_(None))
                    .values(scored_at=now)
                ).rowcount
                if not claimed:
                    continue
                session.add_all(
                    Score(
                        output_id=output_id, probe=probe, value=value, error=error, created_at=now
                    )
                    for probe, value, error in results
                )
                written += 1
        return written

    def _probe(
        self, output: Output, request: Request, partners: dict[str, Output]
    ) -> list[tuple[str, Any, Any]]:
        results: list[tuple[str, float | None, str | None]] = []
        image = self._image(output)
        if image is None:
            return [
                (
                    "image",
                    None,
                    f"artifact {output.artifact_sha256} not found in {self.artifact_dir}",
                )
            ]
        probes = [("typography_cer", lambda: typography_cer(request.prompt, image, self.ocr))]
        if output.role == Arm.CANDIDATE and Arm.INCUMBENT in partners:
            probes.append(
                ("colour_shift_de", lambda: self._against(image, partners[Arm.INCUMBENT]))
            )
        if "previous" in partners:
            probes.append(("frame_drift_de", lambda: self._against(image, partners["previous"])))
        if self.clip is not None:
            probes.append(("clip_score", lambda: self.clip.score(request.prompt, image)))
        for name, probe in probes:
            try:
                value = probe()
                if value is not None and not math.isfinite(float(value)):
                    # A probe's bug must never reach a statistic: an error, not a score.
                    raise ValueError(f"the probe returned {value}, not a finite number")
            # A probe's failure is recorded as such, never as a model error.
            except Exception as exc:
                log.warning(
                    "probe_failed",
                    probe=name,
                    request_id=request.id,
                    stage=request.stage,
                    role=output.role,
                    error=str(exc),
                )
                results.append((name, None, f"{type(exc).__name__}: {exc}"[:1000]))
                continue
            if value is None:
                continue
            results.append((name, float(value), None))
        return results

    def _against(self, image: np.ndarray, other: Output) -> float:
        partner = self._image(other)
        if partner is None:
            raise FileNotFoundError(
                f"artifact {other.artifact_sha256} of the partner output is missing"
            )
        return colour_shift(image, partner)

    def _image(self, output: Output) -> np.ndarray | None:
        if not output.artifact_sha256:
            return None
        path = artifact_path(self.artifact_dir, output.artifact_sha256)
        return from_png(path.read_bytes()) if path.exists() else None


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
