"""A representative suite drawn from recorded traffic: `cutover suite from-shadow-log`.

Synthetic suites test what a team thought of; recorded prompts test what users ask. The
sample is spread two ways so a burst or a popular kind of prompt cannot fill it:
- over tags: requests are grouped by their prompt's tags (quoted text, length, size), and
  every group gets at least one item before the rest is shared out by group size;
- over time: within a group, items are taken at even steps through the group's history.

Users' identifiers are dropped (the sticky key and the request id never reach the
file); the prompt, size and seed are kept, so a render is comparable with what was
served. Only text-to-image routes can be sampled: the router does not keep the input
images of edits and upscales.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.config import Route
from controller.lab.suites import Suite, SuiteItem
from controller.storage.tables import Request
from policies.probes.typography import requested_text

TEXT_ROUTES = (Route.GENERATE, Route.THUMBNAIL)
MAX_SCANNED = 50_000  # the newest requests of the route read; a sample needs no more


def prompt_tags(prompt: str, size: str | None) -> list[str]:
    """Coarse tags that tell kinds of prompts apart (quoted text, length, image size)."""
    words = len(prompt.split())
    tags = ["typography" if requested_text(prompt) else "no-text"]
    tags.append("short" if words <= 8 else "medium" if words <= 25 else "long")
    if size:
        tags.append(f"size-{size}")
    return tags


def spread(groups: dict[tuple[str, ...], list[Any]], n: int) -> list[Any]:
    """`n` items from `groups` (each list oldest first): every group at least one, biggest
    first while `n` lasts, the rest by group size; a group's share is taken at even steps
    through it."""
    if n <= 0 or not groups:
        return []
    keys = sorted(groups, key=lambda k: (-len(groups[k]), k))
    shares = dict.fromkeys(keys, 0)
    left = n
    for key in keys[:n]:  # every group once, biggest first, while n lasts
        shares[key] = 1
        left -= 1
    total = sum(len(groups[k]) for k in keys)
    while left > 0:
        room = [k for k in keys if shares[k] < len(groups[k])]
        if not room:
            break
        # The group furthest below its proportional share gets the next item.
        key = max(room, key=lambda k: len(groups[k]) / total * n - shares[k])
        shares[key] += 1
        left -= 1
    chosen = []
    for key in keys:
        rows, take = groups[key], shares[key]
        step = len(rows) / take if take else 0
        chosen += [rows[math.floor(i * step + step / 2)] for i in range(take)]
    return chosen


def sample_from_log(session: Session, route: Route, n: int, name: str) -> Suite:
    """A suite of `n` recorded prompts of `route` (fewer if fewer distinct ones exist)."""
    if route not in TEXT_ROUTES:
        raise ValueError(
            f"route {route.value} carries input images the router does not keep; "
            f"sample {' or '.join(r.value for r in TEXT_ROUTES)}, or write {route.value} items "
            "by hand with their images"
        )
    query = select(Request.prompt, Request.params, Request.seed, Request.created_at).where(
        Request.route == route.value
    )
    rows = session.execute(query.order_by(Request.created_at.desc()).limit(MAX_SCANNED)).all()
    seen: set[str] = set()
    groups: dict[tuple[str, ...], list[Any]] = defaultdict(list)
    for row in reversed(rows):  # oldest first, so steps run through time
        if row.prompt in seen:
            continue
        seen.add(row.prompt)
        size = (row.params or {}).get("size")
        groups[tuple(prompt_tags(row.prompt, size))].append((row, size))
    picked = sorted(spread(groups, n), key=lambda p: p[0].created_at)
    if not picked:
        raise ValueError(f"no recorded {route.value} requests to sample")
    first, last = picked[0][0].created_at, picked[-1][0].created_at
    items = []
    for index, (row, size) in enumerate(picked):
        items.append(
            SuiteItem(
                id=f"{route.value}-{index + 1:04d}",
                route=route,
                prompt=row.prompt,
                tags=prompt_tags(row.prompt, size),
                size=size,
                seed=row.seed % 2**31,
            )
        )
    return Suite(
        suite=name,
        version=1,
        description=(
            f"{len(items)} distinct {route.value} prompts recorded between "
            f"{first:%Y-%m-%d %H:%M} and {last:%Y-%m-%d %H:%M} UTC, spread over tags and time; "
            "users' identifiers dropped"
        ),
        items=items,
    )


def suite_yaml(suite: Suite) -> str:
    """The suite as a file `load_suite` reads back."""
    import yaml

    data = suite.model_dump(mode="json")
    data["items"] = [
        {k: v for k, v in item.items() if v not in (None, [])} for item in data["items"]
    ]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
