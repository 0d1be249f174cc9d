"""The bake-off's HTML report: the ranking with its intervals, the worst pairs per check, and
a grid of every prompt (rows) by every model (columns), filtered by tag.

Self-contained like the rollout report (`report.py`): images inlined, no script, the
tag filter done with radio buttons and CSS, and every prompt autoescaped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.config import Config
from controller.lab.suites import SuiteItem, load_suite
from controller.review.failures import bakeoff_failures, cluster, report_clusters
from controller.review.report import data_uri
from controller.storage.artifacts import artifact_path
from controller.storage.tables import LabOutput, LabRun
from policies.policy import Policy
from workers.jobs import OutputStatus

WORST_SHOWN = 6  # pairs per check
GRID_ROWS = 300  # units in the grid, in suite order


def build_bakeoff_report(session: Session, config: Config, run_id: int, policy: Policy) -> str:
    run = session.get(LabRun, run_id)
    if run is None or run.result is None:
        raise ValueError(f"lab run {run_id} has no result yet: run the bake-off first")
    result = run.result
    rows = session.scalars(select(LabOutput).where(LabOutput.run_id == run_id)).all()
    outputs = {(r.model, r.unit): r for r in rows}
    items = _items(result.get("suite_files", {}))
    models = [result["baseline"]] + [s["model"] for s in result["ranking"]]
    units = sorted({r.unit for r in rows}, key=_unit_order)
    tags = sorted({t for u in units for t in _item(items, u).tags})
    tag_class = {t: f"t{i}" for i, t in enumerate(tags)}

    def image(model: str, unit: str) -> dict[str, Any]:
        row = outputs.get((model, unit))
        if row is None:
            return {"status": "not rendered", "src": None}
        src = None
        if row.artifact_sha256:
            src = data_uri(str(artifact_path(config.artifact_path, row.artifact_sha256)))
        return {"status": row.status, "src": src, "error": row.error}

    grid = [
        {
            "unit": unit,
            "prompt": _item(items, unit).prompt,
            "tags": _item(items, unit).tags,
            "classes": " ".join(tag_class[t] for t in _item(items, unit).tags),
            "cells": [image(m, unit) for m in models],
        }
        for unit in units[:GRID_ROWS]
    ]
    env = Environment(
        loader=PackageLoader("controller.review", "templates"),
        autoescape=select_autoescape(default=True),
    )
    return env.get_template("bakeoff.html.j2").render(
        result=result,
        models=models,
        worst=_worst(result, outputs, items, image),
        grid=grid,
        shown=len(grid),
        total=len(units),
        tags=[(t, tag_class[t]) for t in tags],
        clusters=report_clusters(
            cluster(bakeoff_failures(session, run_id, policy, config.artifact_path))
        ),
    )


def _unit_order(unit: str) -> tuple[str, str, int]:
    suite, item, seed = unit.rsplit("/", 2)
    return suite, item, int(seed)


def _items(files: dict[str, str]) -> dict[tuple[str, str], SuiteItem]:
    found = {}
    for suite, path in files.items():
        if Path(path).is_file():
            for item in load_suite(Path(path)).items:
                found[(suite, item.id)] = item
    return found


def _item(items: dict[tuple[str, str], SuiteItem], unit: str) -> SuiteItem:
    suite, item, _ = unit.rsplit("/", 2)
    return items.get((suite, item)) or SuiteItem(id="unknown", prompt=f"({unit}: suite file gone)")


def _worst(
    result: dict[str, Any],
    outputs: dict[tuple[str, str], LabOutput],
    items: dict[tuple[str, str], SuiteItem],
    image: Any,
) -> list[dict[str, Any]]:
    """Per check, the pairs furthest on the wrong side, over every model: failed images for the
    rate checks, the largest colour shift, the largest CER increase over the baseline's."""
    baseline = result["baseline"]
    sections = []

    def value(model: str, unit: str, probe: str) -> float | None:
        row = outputs.get((model, unit))
        if row is None or not row.scores:
            return None
        return row.scores.get("values", {}).get(probe)

    measures = {
        "failures (error, timeout, oom, blank)": lambda m, u: (
            1.0
            if outputs[(m, u)].status != OutputStatus.OK
            and outputs.get((baseline, u)) is not None
            and outputs[(baseline, u)].status == OutputStatus.OK
            else None
        ),
        "colour shift against the baseline (ΔE)": lambda m, u: value(m, u, "colour_shift_de"),
        "typography CER minus the baseline's": lambda m, u: (
            None
            if value(m, u, "typography_cer") is None or value(baseline, u, "typography_cer") is None
            else value(m, u, "typography_cer") - value(baseline, u, "typography_cer")
        ),
    }
    for title, measure in measures.items():
        scored = []
        for model, unit in outputs:
            if model == baseline:
                continue
            v = measure(model, unit)
            if v is not None and v > 0:
                scored.append((v, model, unit))
        scored.sort(key=lambda t: (-t[0], t[1], t[2]))
        sections.append(
            {
                "title": title,
                "pairs": [
                    {
                        "value": v,
                        "model": model,
                        "unit": unit,
                        "prompt": _item(items, unit).prompt,
                        "baseline": image(baseline, unit),
                        "candidate": image(model, unit),
                    }
                    for v, model, unit in scored[:WORST_SHOWN]
                ],
            }
        )
    return sections
