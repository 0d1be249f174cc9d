"""The scorer on recorded pairs with real PNG artifacts: score rows, probe errors, and the judge's use of them."""

from __future__ import annotations

import io
import uuid

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select

from controller.rollout.analysis import load_window
from controller.rollout.scoring import Scorer, partners_of
from controller.rollout.transitions import get_rollout
from controller.storage.artifacts import store_artifact
from controller.storage.tables import Output, Score, utcnow
from policies.judge import evaluate, state_of
from policies.policy import load_policy
from tests.conftest import add_request, base_config, prepare_rollout, write_config


def poster_png(text: str, tint=(0, 0, 0)) -> bytes:
    image = Image.new("RGB", (420, 120), (240, 240, 230))
    ImageDraw.Draw(image).text(
        (20, 35), text, fill=(20, 20, 20), font=ImageFont.load_default(size=40)
    )
    pixels = np.clip(np.asarray(image).astype(int) + tint, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


OPEN_SIGN = 'a sign that says "OPEN"'


def test_scorer_writes_scores_and_probe_errors(tmp_path, db_url):
    config, store = prepare_rollout(write_config(tmp_path, base_config(db_url)))
    artifacts = tmp_path / "artifacts"
    now = utcnow()
    with store.session() as session:
        rollout = get_rollout(session, config.name)
        pairs = []
        for i, (inc_text, cand_text, tint) in enumerate(
            [("OPEN", "OPEN", (0, 0, 0)), ("OPEN", "QPXN", (60, 0, -40))]
        ):
            request = add_request(
                session,
                rollout.id,
                sticky_key=f"u{i}",
                prompt=OPEN_SIGN,
                seed=i,
                mirrored=True,
                created_at=now,
            )
            outputs = {}
            for role, text, t in (
                ("incumbent", inc_text, (0, 0, 0)),
                ("candidate", cand_text, tint),
            ):
                outputs[role] = Output(
                    id=str(uuid.uuid4()),
                    request_id=request.id,
                    role=role,
                    image_index=0,
                    is_primary=role == "incumbent",
                    status="ok",
                    created_at=now,
                    latency_ms=100,
                    artifact_sha256=store_artifact(artifacts, poster_png(text, t)),
                )
                session.add(outputs[role])
            pairs.append(outputs)
        broken = Output(
            id=str(uuid.uuid4()),
            request_id=pairs[0]["incumbent"].request_id,
            role="incumbent",
            image_index=1,
            is_primary=True,
            status="ok",
            created_at=now,
            artifact_sha256="0" * 64,
        )
        session.add(broken)
    scorer = Scorer(load_policy(), artifacts)
    assert scorer.score_pending(store, rollout.id) == 5
    assert scorer.score_pending(store, rollout.id) == 0  # settled outputs are never scored twice
    with store.reader() as session:
        scores = {
            (s.output_id, s.probe): (s.value, s.error) for s in session.scalars(select(Score))
        }
        statuses = {o.id: o.status for o in session.scalars(select(Output))}
        assert all(o.scored_at is not None for o in session.scalars(select(Output)))
    assert scores[(pairs[0]["incumbent"].id, "typography_cer")] == (0.0, None)
    assert scores[(pairs[1]["candidate"].id, "typography_cer")][0] >= 0.5
    assert scores[(pairs[0]["candidate"].id, "colour_shift_de")][0] < 0.5
    assert scores[(pairs[1]["candidate"].id, "colour_shift_de")][0] > 5
    # A probe error, recorded as such, for each probe that would have scored the image ...
    assert scores[(broken.id, "typography_cer")][1].startswith("artifact")
    assert statuses[broken.id] == "ok"  # ... and never as a model error
    with store.reader() as session:
        window = load_window(session, get_rollout(session, config.name), {})
    assert sorted(pair for u in window.units for pair in u.scores["typography_cer"]) == sorted(
        [(0.0, 0.0), (scores[(pairs[1]["candidate"].id, "typography_cer")][0], 0.0)]
    )
    # One output in five could not be read: more than the default 5% of probe errors, so the
    # probes' checks hold the rollout and say why ...
    held = {r.name: r for r in evaluate(state_of(load_policy(), window))}
    assert held["typography_cer"].probe_error and "artifact" in held["typography_cer"].reason
    # ... and with a policy that tolerates it, they judge the two pairs.
    lenient = load_policy().model_copy(update={"max_probe_error_share": 0.5})
    results = {r.name: r for r in evaluate(state_of(lenient, window))}
    assert results["colour_shift"].samples == 2 and results["typography_cer"].samples == 2
    store.close()


def test_partners_are_the_other_role_and_the_previous_image():
    """Colour shift compares with the other role's image of the same index; frame drift with
    this role's previous image of the request. The output itself is never its own partner."""

    def output(role: str, index: int) -> Output:
        return Output(id=f"{role}-{index}", request_id="r", role=role, image_index=index)

    siblings = [output(role, i) for role in ("incumbent", "candidate") for i in range(3)]
    partners = partners_of(siblings[4], siblings)  # candidate, image 1
    assert {k: v.id for k, v in partners.items()} == {
        "incumbent": "incumbent-1",
        "previous": "candidate-0",
    }
    first = partners_of(siblings[0], siblings)  # incumbent, image 0: no previous image
    assert {k: v.id for k, v in first.items()} == {"candidate": "candidate-0"}


class _WritesWhileReading:
    """The real OCR engine, plus a check made while it runs: can another writer take SQLite's
    write lock right now (busy timeout 0)? The recorder needs it at any moment."""

    def __init__(self, engine, database: str) -> None:
        self.engine = engine
        self.database = database
        self.lock_free: list[bool] = []

    def read(self, image):
        import sqlite3

        probe = sqlite3.connect(self.database, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            self.lock_free.append(True)
        except sqlite3.OperationalError:
            self.lock_free.append(False)
        finally:
            probe.close()
        return self.engine.read(image)


def test_probes_run_with_no_write_lock_held(tmp_path, sqlite_url):
    """On SQLite the scorer once held the write lock while OCR ran over a batch, starving the
    recorder into spilling with no outage. Probes now run outside any transaction."""
    from sqlalchemy.engine import make_url

    config, store = prepare_rollout(write_config(tmp_path, base_config(sqlite_url)))
    artifacts = tmp_path / "artifacts"
    now = utcnow()
    with store.session() as session:
        rollout = get_rollout(session, config.name)
        for i in range(3):
            request = add_request(
                session,
                rollout.id,
                id=f"r{i}",
                sticky_key=f"u{i}",
                prompt=OPEN_SIGN,
                seed=i,
                created_at=now,
            )
            session.add(
                Output(
                    id=f"o{i}",
                    request_id=request.id,
                    role="incumbent",
                    image_index=0,
                    is_primary=True,
                    status="ok",
                    created_at=now,
                    artifact_sha256=store_artifact(artifacts, poster_png("OPEN")),
                )
            )
    scorer = Scorer(load_policy(), artifacts)
    watcher = _WritesWhileReading(scorer.ocr, make_url(sqlite_url).database)
    scorer.__dict__["ocr"] = watcher
    assert scorer.score_pending(store, rollout.id) == 3
    assert watcher.lock_free == [True, True, True]
    with store.reader() as session:
        assert len(session.scalars(select(Score).where(Score.probe == "typography_cer")).all()) == 3
    store.close()


def test_a_probe_returning_nan_stores_an_error_never_a_score(tmp_path, sqlite_url, monkeypatch):
    """NaN from a probe (here the colour probe, through a hook) is a probe error: no score row
    carries it, so no statistic can, and the judge counts it against the probe."""
    import policies.probes.pack

    monkeypatch.setattr(policies.probes.pack, "colour_shift", lambda a, b: float("nan"))
    config, store = prepare_rollout(write_config(tmp_path, base_config(sqlite_url)))
    artifacts = tmp_path / "artifacts"
    now = utcnow()
    with store.session() as session:
        rollout = get_rollout(session, config.name)
        request = add_request(session, rollout.id, prompt="a fox", mirrored=True, created_at=now)
        for role in ("incumbent", "candidate"):
            session.add(
                Output(
                    id=f"{role}-0",
                    request_id=request.id,
                    role=role,
                    image_index=0,
                    is_primary=role == "incumbent",
                    status="ok",
                    created_at=now,
                    latency_ms=100,
                    artifact_sha256=store_artifact(artifacts, poster_png("fox")),
                )
            )
    assert Scorer(load_policy(), artifacts).score_pending(store, rollout.id) == 2
    with store.reader() as session:
        row = session.scalars(select(Score).where(Score.probe == "colour_shift_de")).one()
        window = load_window(session, get_rollout(session, config.name), {})
    assert row.value is None and "not a finite number" in row.error
    assert window.units[0].scores.get("colour_shift_de", []) == []
    assert window.probe_health["colour_shift_de"].errors == 1
    store.close()
