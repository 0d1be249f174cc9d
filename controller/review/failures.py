"""Failure clusters: the failing pairs of a rollout or a bake-off, grouped by what they share.

A slice finding (`policies/slices.py`) names a kind of prompt the judge was told about
by a tag. The failures nobody thought to tag show up here: every pair on the wrong side
of a check (the shadow log's `--failing` rule, `Check.pair_fails`) is described by
cheap features and grouped, so an SRE reads five clusters instead of five hundred pairs:

- the prompt's tags, one-hot (what kind of request);
- the candidate image's colour statistics (mean and spread of CIELAB) and its edge
  density (what the picture looks like: blank, washed out, flat, busy);
- with `clip_model` in the policy, the candidate image's CLIP embedding.

Features are scaled to unit spread and grouped by Ward's agglomerative clustering, cut at
`clusters` groups, or by default where the merge heights jump most (at most 8 groups),
which is deterministic: the same pairs always give the same clusters. A cluster is listed with
its size, the tags most of its pairs share, the checks they fail, representative prompts
(nearest the cluster's centre) and example pairs; `to_suite` writes its prompts out as a
stress suite for the next validation.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.config import Route
from controller.lab.render import LabUnit, units_of
from controller.lab.suites import NEEDS_IMAGE, Suite, SuiteItem, find_suite, load_suite
from controller.review.shadow_log import Filters, observed, shadow_log
from controller.storage.artifact_store import ensure_local
from controller.storage.artifacts import artifact_path
from controller.storage.tables import LabOutput, LabRun, Rollout
from policies.metrics import Observed
from policies.policy import Policy
from policies.prompt_tags import stored_or_derived
from policies.vocabulary import Arm
from workers.images import from_png

COMMON = 0.8  # a tag most of a cluster's pairs carry
MAX_CLUSTERS = 8
SCANNED = 2000  # the newest pairs of a rollout looked at


@dataclass
class FailingPair:
    """One pair on the wrong side of at least one check."""

    key: str  # the request id (rollout) or the unit key (bake-off)
    prompt: str
    route: str
    size: str | None
    seed: int
    tags: tuple[str, ...]
    checks: tuple[str, ...]  # the checks it fails
    candidate: str | None  # image paths
    incumbent: str | None
    model: str | None = None  # in a bake-off, the model compared with the baseline
    inputs: dict[str, str] = field(default_factory=dict)  # a lab item's image and mask paths


@dataclass
class Cluster:
    number: int
    pairs: list[FailingPair]
    common_tags: list[str]
    checks: dict[str, int]
    representatives: list[FailingPair]

    def as_dict(self, examples: int = 5) -> dict[str, Any]:
        return {
            "cluster": self.number,
            "size": len(self.pairs),
            "common_tags": self.common_tags,
            "checks": self.checks,
            "representative_prompts": [p.prompt for p in self.representatives],
            "examples": [
                {
                    "key": p.key,
                    "model": p.model,
                    "prompt": p.prompt,
                    "checks": list(p.checks),
                    "candidate": p.candidate,
                    "incumbent": p.incumbent,
                }
                for p in self.pairs[:examples]
            ],
        }


def rollout_failures(
    session: Session, rollout: Rollout, policy: Policy, artifact_dir: Path, scanned: int = SCANNED
) -> list[FailingPair]:
    """The failing pairs among the rollout's newest `scanned` recorded pairs."""
    return failing_rows(
        shadow_log(session, rollout, policy, Filters(limit=scanned), artifact_dir), policy
    )


def failing_rows(rows: list[dict[str, Any]], policy: Policy) -> list[FailingPair]:
    """The shadow-log rows (`controller/review/shadow_log.py`) that fail a check, as pairs."""
    found = []
    for row in rows:
        cand, inc = row[Arm.CANDIDATE], row[Arm.INCUMBENT]
        if cand["status"] is None or inc["status"] is None:
            continue  # one side not recorded (yet): nothing to compare
        failed = _failed(policy, observed(cand), observed(inc))
        if not failed:
            continue
        params = row["params"] or {}
        found.append(
            FailingPair(
                key=row["request_id"],
                prompt=row["prompt"],
                route=row["route"],
                size=params.get("size"),
                seed=int(row["seed"]) + row["image_index"],
                tags=tuple(stored_or_derived(row["tags"], row["prompt"], row["route"], params)),
                checks=failed,
                candidate=cand["artifact"],
                incumbent=inc["artifact"],
            )
        )
    return found


def bakeoff_failures(
    session: Session, run_id: int, policy: Policy, artifact_dir: Path
) -> list[FailingPair]:
    """The failing pairs (each compared model against the baseline) of a lab run."""
    run = session.get(LabRun, run_id)
    if run is None:
        raise ValueError(f"no bake-off or validation run {run_id}; `cutover bakeoff` prints its id")
    units = {u.key: u for u in _units_of(run)}
    rows = session.scalars(select(LabOutput).where(LabOutput.run_id == run_id)).all()
    baseline = {r.unit: r for r in rows if r.model == run.baseline}
    found = []
    for row in rows:
        base = baseline.get(row.unit)
        unit = units.get(row.unit)
        if row.model == run.baseline or base is None or unit is None:
            continue
        failed = _failed(policy, _lab_observed(row), _lab_observed(base))
        if not failed:
            continue
        item = unit.item
        inputs = {
            key: str((unit.suite_dir / name).resolve())
            for key, name in (("image", item.image), ("mask", item.mask))
            if name
        }
        found.append(
            FailingPair(
                key=row.unit,
                prompt=item.prompt,
                route=item.route.value,
                size=item.size,
                seed=unit.seed,
                tags=unit.tags,
                checks=failed,
                candidate=_path(artifact_dir, row.artifact_sha256),
                incumbent=_path(artifact_dir, base.artifact_sha256),
                model=row.model,
                inputs=inputs,
            )
        )
    return found


def cluster(
    pairs: list[FailingPair], clusters: int | None = None, clip: Any = None
) -> list[Cluster]:
    """The pairs in groups of what they share, biggest first."""
    if not pairs:
        return []
    features = _features(pairs, clip)
    if len(pairs) == 1 or clusters == 1:
        labels = np.ones(len(pairs), dtype=int)
    else:
        from scipy.cluster.hierarchy import fcluster, linkage

        tree = linkage(features, method="ward")
        k = min(clusters or _natural_count(tree[:, 2]), len(pairs))
        labels = fcluster(tree, t=k, criterion="maxclust")
    groups = []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        centre = features[members].mean(axis=0)
        order = members[np.argsort(((features[members] - centre) ** 2).sum(axis=1), kind="stable")]
        groups.append([pairs[i] for i in order])
    groups.sort(key=lambda g: (-len(g), g[0].key))
    return [_described(number, group) for number, group in enumerate(groups, start=1)]


def _natural_count(heights: np.ndarray) -> int:
    """Where the merge heights jump most (at most MAX_CLUSTERS groups); one group when the
    last merge is no taller than twice the typical one (nothing stands apart)."""
    n = len(heights) + 1
    if heights[-1] <= 2 * float(np.median(heights)):
        return 1
    best = max(
        range(2, min(MAX_CLUSTERS, n) + 1), key=lambda k: heights[n - k] - heights[n - k - 1]
    )
    return best


def to_suite(found: Cluster, name: str, source: str) -> Suite:
    """The cluster's distinct prompts as a suite (one item each, at the pair's seed)."""
    items, seen = [], set()
    for pair in found.pairs:
        if (pair.prompt, pair.route) in seen or _needs_input(pair):
            continue
        seen.add((pair.prompt, pair.route))
        route = Route(pair.route)
        hand = [t.removeprefix("tag:") for t in pair.tags if t.startswith("tag:")]
        items.append(
            SuiteItem(
                id=f"c{found.number}-{len(items) + 1:04d}",
                route=route,
                prompt=pair.prompt,
                tags=[f"cluster-{found.number}", *hand],
                size=pair.size,
                seed=pair.seed % 2**31,
                image=pair.inputs.get("image"),
                mask=pair.inputs.get("mask"),
            )
        )
    if not items:
        raise ValueError(
            f"cluster {found.number} holds only edits or upscales of a rollout, whose input "
            "images the router does not keep: write those items by hand"
        )
    shared = ", ".join(found.common_tags) or "no tag in common"
    return Suite(
        suite=name,
        version=1,
        description=(
            f"Cluster {found.number} of the failing pairs of {source}: {len(found.pairs)} pairs "
            f"failing {', '.join(found.checks)}; tags in common: {shared}"
        ),
        items=items,
    )


def needs_inputs(found: Cluster) -> list[str]:
    """Prompts of the cluster a suite cannot carry: edits and upscales of a rollout, whose
    input images the router does not keep."""
    return [p.prompt for p in found.pairs if _needs_input(p)]


def _needs_input(pair: FailingPair) -> bool:
    return Route(pair.route) in NEEDS_IMAGE and not pair.inputs


def report_clusters(groups: list[Cluster], examples: int = 4) -> list[dict[str, Any]]:
    """The clusters as the HTML reports show them: each with example pairs' images inline."""
    from controller.review.report import data_uri

    shown = []
    for g in groups:
        entry = g.as_dict(examples)
        for example in entry["examples"]:
            for side in ("candidate", "incumbent"):
                path = example[side]
                example[side] = data_uri(path)
        shown.append(entry)
    return shown


def render_clusters(source: str, failing: int, groups: list[Cluster]) -> Any:
    """The clusters as the terminal shows them."""
    from rich.table import Table
    from rich.text import Text

    if not groups:
        return Text(f"{source}: no failing pairs among those recorded")
    table = Table(
        title=f"{source}: {failing} failing pairs in {len(groups)} clusters", title_justify="left"
    )
    for column in ("#", "pairs", "fails", "tags in common", "representative prompts"):
        table.add_column(column)
    for g in groups:
        table.add_row(
            str(g.number),
            str(len(g.pairs)),
            ", ".join(f"{name} ({n})" for name, n in g.checks.items()),
            ", ".join(g.common_tags) or "-",
            Text("\n".join(p.prompt for p in g.representatives)),
        )
    return table


def _described(number: int, group: list[FailingPair]) -> Cluster:
    tags = Counter(t for p in group for t in set(p.tags))
    common = sorted(t for t, n in tags.items() if n >= COMMON * len(group))
    checks = Counter(c for p in group for c in p.checks)
    representatives, prompts = [], set()
    for pair in group:  # nearest the centre first
        if pair.prompt not in prompts:
            prompts.add(pair.prompt)
            representatives.append(pair)
        if len(representatives) == 3:
            break
    return Cluster(number, group, common, dict(checks.most_common()), representatives)


def _features(pairs: list[FailingPair], clip: Any) -> np.ndarray:
    vocabulary = sorted({t for p in pairs for t in p.tags})
    index = {t: i for i, t in enumerate(vocabulary)}
    tags = np.zeros((len(pairs), len(vocabulary)))
    for row, pair in enumerate(pairs):
        for tag in pair.tags:
            tags[row, index[tag]] = 1.0
    looks = np.array([_image_features(p.candidate) for p in pairs])
    # The picture's seven figures weigh as much as one tag: tags say what was asked,
    # and differ by whole units; the figures vary by degrees between any two images.
    parts = [tags, _scaled(looks) / math.sqrt(looks.shape[1])]
    if clip is not None:
        parts.append(np.array([_embedding(clip, p.candidate) for p in pairs]))
    return np.hstack(parts)


def _image_features(path: str | None) -> list[float]:
    """Mean and spread of CIELAB, and edge density: what the picture looks like, cheaply."""
    from skimage.color import rgb2lab
    from skimage.filters import sobel

    found = ensure_local(path)
    if found is None:
        return [0.0] * 7  # no image (the model failed): its status already sets it apart
    image = from_png(found.read_bytes())
    lab = rgb2lab(image / 255.0).reshape(-1, 3)
    edges = float(sobel(lab[:, 0].reshape(image.shape[:2]) / 100).mean())
    return [*lab.mean(axis=0).tolist(), *lab.std(axis=0).tolist(), edges]


def _embedding(clip: Any, path: str | None) -> np.ndarray:
    found = ensure_local(path)
    if found is None:
        return np.zeros(clip.dimensions)
    return clip.embed(from_png(found.read_bytes()))


def _scaled(values: np.ndarray) -> np.ndarray:
    spread = values.std(axis=0)
    spread[spread == 0] = 1.0
    return (values - values.mean(axis=0)) / spread


def _failed(policy: Policy, candidate: Observed, incumbent: Observed) -> tuple[str, ...]:
    return tuple(c.name for c in policy.checks if c.pair_fails(candidate, incumbent))


def _lab_observed(row: LabOutput) -> Observed:
    values = (row.scores or {}).get("values", {})
    return Observed(row.status, {"latency_ms": row.latency_ms}, values)


def _path(artifact_dir: Path, sha256: str | None) -> str | None:
    return str(artifact_path(artifact_dir, sha256)) if sha256 else None


def _units_of(run: LabRun) -> list[LabUnit]:
    files = (run.result or {}).get("suite_files") or {}
    suites = []
    for name in run.suites:
        path = Path(files[name]) if name in files else find_suite(name)
        suites.append((load_suite(path), path))
    return units_of(suites, run.seeds, set(Route))
