"""Recorded pairs as the router leaves them: request and output rows written by the real
Recorder, with real PNGs in the artifact directory, and the scorer's colour scores.

The console's bench (10,000 pairs) and the console's tests seed their rollouts with it.
"""

from __future__ import annotations

import io
import random
import uuid
from collections.abc import Sequence
from datetime import timedelta

from PIL import Image
from sqlalchemy import insert

from controller.config import Config
from controller.rollout.transitions import get_rollout
from controller.storage.recorder import Recorder
from controller.storage.records import OutputRecord, RequestRecord
from controller.storage.store import Store
from controller.storage.tables import Score, utcnow
from policies.prompt_tags import tags_of


def png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


def seed_pairs(
    config: Config,
    store: Store,
    prompts: Sequence[str],
    *,
    distinct_images: int = 50,
    seed: int = 0,
) -> list[str]:
    """One mirrored request per prompt with both arms' outputs (ok, with an image) and a
    `colour_shift_de` score on the candidate's; returns the request ids, oldest first."""
    rng = random.Random(seed)
    plan = config.plan()
    with store.reader() as session:
        row = get_rollout(session, plan.name)
        stage = row.stage_name
    images = [
        png((rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        for _ in range(distinct_images)
    ]
    recorder = Recorder(config.resolved_database_url, config.artifact_path, config.spill_path)
    start = utcnow() - timedelta(seconds=len(prompts))
    ids, outputs = [], {}
    try:
        for i, prompt in enumerate(prompts):
            request_id = str(uuid.uuid4())
            at = start + timedelta(seconds=i)
            params = {"size": "64x64"}
            recorder.record(
                RequestRecord(
                    request_id,
                    plan.name,
                    plan.route.value,
                    stage,
                    "incumbent",
                    f"u{i}",
                    prompt,
                    params,
                    i,
                    True,
                    at,
                    tags_of(prompt, plan.route.value, params),
                )
            )
            for role, model in (("incumbent", plan.incumbent), ("candidate", plan.candidate)):
                output_id = str(uuid.uuid4())
                recorder.record(
                    OutputRecord(
                        output_id,
                        request_id,
                        role,
                        0,
                        role == "incumbent",
                        "ok",
                        at,
                        latency_ms=rng.uniform(80, 120),
                        batch_size=1,
                        model=model,
                    ),
                    png=rng.choice(images),
                )
                if role == "candidate":
                    outputs[output_id] = rng.expovariate(0.5)
            ids.append(request_id)
        assert recorder.flush(timeout=120), "the recorder did not drain"
    finally:
        recorder.close()
    with store.session() as session:
        session.execute(
            insert(Score),
            [
                {
                    "output_id": output_id,
                    "probe": "colour_shift_de",
                    "value": value,
                    "created_at": utcnow(),
                }
                for output_id, value in outputs.items()
            ],
        )
    return ids
