"""The unit both the judge and the shadow log compare: one request's image, from each role.

Outputs of the same request and image index form a pair (incumbent and candidate,
same prompt, parameters and seed); probe scores hang off each output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.storage.tables import Output, Score

PairKey = tuple[str, int]  # (request id, image index)

# Keeps each IN (...) list well inside every database's limit on bound parameters.
_CHUNK = 500


def group_pairs(outputs: Iterable[Output]) -> dict[PairKey, dict[str, Output]]:
    """Outputs by (request, image index), then by role; insertion order is the outputs' order."""
    pairs: dict[PairKey, dict[str, Output]] = {}
    for output in outputs:
        pairs.setdefault((output.request_id, output.image_index), {})[output.role] = output
    return pairs


def score_rows(
    session: Session, output_ids: list[str]
) -> list[tuple[str, str, float | None, str | None]]:
    """Every score row of these outputs, errors included, rows of probes the sampling left out
    excluded: (output id, probe, value, error)."""
    rows: list[tuple[str, str, float | None, str | None]] = []
    for start in range(0, len(output_ids), _CHUNK):
        rows.extend(
            session.execute(
                select(Score.output_id, Score.probe, Score.value, Score.error).where(
                    Score.output_id.in_(output_ids[start : start + _CHUNK]),
                    Score.sampled.is_(True),
                )
            ).all()
        )
    return rows


def scores_by_output(session: Session, output_ids: list[str]) -> dict[str, dict[str, float]]:
    """Probe values (errors and non-finite values left out) per output id: {output id: {probe: value}}."""
    found: dict[str, dict[str, float]] = {}
    for output_id, probe, value, _ in score_rows(session, output_ids):
        if value is not None and math.isfinite(value):
            found.setdefault(output_id, {})[probe] = value
    return found
