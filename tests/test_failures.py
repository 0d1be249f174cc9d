"""`cutover failures`: failing pairs grouped by what they share, and written out as a suite."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from controller.cli import app
from controller.config import load_config
from controller.lab.runs import plan_run
from controller.lab.suites import load_suite
from controller.review.failures import FailingPair, cluster
from controller.rollout.transitions import get_rollout
from controller.storage.artifacts import store_artifact
from controller.storage.tables import Output, Score, utcnow
from policies.prompt_tags import tags_of
from tests.conftest import add_request, base_config, prepare_rollout, write_config
from workers.images import to_png

runner = CliRunner()
LONG_TEXT = 'a poster that says "Every Journey Starts Here" number {n}'
PLAIN = "a quiet green forest at dawn, picture {n}"


def record_pairs(tmp_path, sqlite_url):
    """Twelve long-text pairs whose candidate misreads, eight plain ones whose candidate
    errors, and six that pass."""
    path = write_config(tmp_path, base_config(sqlite_url))
    config, store = prepare_rollout(path)
    rng = np.random.default_rng(0)
    now = utcnow()
    with store.session() as session:
        rollout = get_rollout(session, config.name)
        for n in range(26):
            kind = "text" if n < 12 else "error" if n < 20 else "fine"
            prompt = (LONG_TEXT if kind != "error" else PLAIN).format(n=n)
            request = add_request(
                session,
                rollout.id,
                prompt=prompt,
                params={"size": "64x64"},
                tags=tags_of(prompt, "generate", {"size": "64x64"}),
                mirrored=True,
                seed=100 + n,
                created_at=now,
            )
            for role in ("incumbent", "candidate"):
                failed = role == "candidate" and kind == "error"
                pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
                output = Output(
                    id=f"{role}-{n}",
                    request_id=request.id,
                    role=role,
                    image_index=0,
                    is_primary=role == "incumbent",
                    status="error" if failed else "ok",
                    created_at=now,
                    latency_ms=100,
                    artifact_sha256=None
                    if failed
                    else store_artifact(config.artifact_path, to_png(pixels)),
                )
                session.add(output)
                session.flush()
                if kind != "error":
                    cer = 0.9 if role == "candidate" and kind == "text" else 0.1
                    session.add(Score(output_id=output.id, probe="typography_cer", value=cer))
    store.close()
    return path


def test_failing_pairs_cluster_by_kind_and_a_cluster_becomes_a_suite(tmp_path, sqlite_url):
    path = record_pairs(tmp_path, sqlite_url)
    result = runner.invoke(app, ["-c", str(path), "failures", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["failing_pairs"] == 20  # the six passing pairs are not listed
    sizes = {c["size"]: c for c in found["clusters"]}
    assert set(sizes) == {12, 8}
    text, errors = sizes[12], sizes[8]
    assert "text:13+" in text["common_tags"] and text["checks"]["typography_cer"] == 12
    assert "text:none" in errors["common_tags"] and errors["checks"]["error_rate"] == 8
    assert all("Every Journey" in p for p in text["representative_prompts"])
    assert len(text["examples"]) == 5 and text["examples"][0]["candidate"].endswith(".png")

    suite_file = tmp_path / "stress-long-text.yaml"
    number = next(c["cluster"] for c in found["clusters"] if c["size"] == 12)
    wrote = runner.invoke(
        app,
        ["-c", str(path), "failures", "--to-suite", str(suite_file), "--cluster", str(number)],
        catch_exceptions=False,
    )
    assert wrote.exit_code == 0, wrote.output
    suite = load_suite(suite_file)
    assert len(suite.items) == 12 and suite.suite == "stress-long-text"
    assert {i.seed for i in suite.items} == set(range(100, 112))
    assert all(f"cluster-{number}" in i.tags for i in suite.items)
    checked = runner.invoke(app, ["-c", str(path), "suite", "check", str(suite_file)])
    assert checked.exit_code == 0, checked.output
    plan = plan_run(load_config(path), [str(suite_file)], ["candidate"], "incumbent", 1)
    assert len(plan.units) == 12  # what `bakeoff` renders; `validate` reads suites the same way


def test_an_unknown_cluster_is_refused_saying_how_many_there_are(tmp_path, sqlite_url):
    path = record_pairs(tmp_path, sqlite_url)
    result = runner.invoke(
        app, ["-c", str(path), "failures", "--to-suite", str(tmp_path / "x.yaml"), "--cluster", "9"]
    )
    assert result.exit_code == 2
    assert "has 2 failure clusters" in result.output
    assert not (tmp_path / "x.yaml").exists()


def test_clusters_are_deterministic_and_one_pair_is_one_cluster():
    pairs = [
        FailingPair(f"r{n}", f"p{n % 3}", "generate", None, n, (f"k:{n % 3}",), ("c",), None, None)
        for n in range(12)
    ]
    first = [[p.key for p in c.pairs] for c in cluster(pairs)]
    assert first == [[p.key for p in c.pairs] for c in cluster(list(pairs))]
    assert sorted(len(c) for c in first) == [4, 4, 4]
    assert len(cluster(pairs[:1])) == 1 and cluster([]) == []


def test_the_report_shows_the_clusters_with_their_images(tmp_path, sqlite_url):
    from controller.review.report import build_report
    from controller.storage.store import Store
    from policies.policy import load_policy

    path = record_pairs(tmp_path, sqlite_url)
    config = load_config(path)
    store = Store(config.resolved_database_url)
    with store.reader() as session:
        html = build_report(session, get_rollout(session, config.name), config, load_policy())
    store.close()
    assert "Cluster 1: 12 pairs" in html and "Cluster 2: 8 pairs" in html
    assert "tags in common: " in html and "text:13+" in html
    assert html.count('alt="candidate" src="data:image/png;base64,') >= 4


def test_with_a_local_clip_in_the_policy_clusters_use_its_embeddings(tmp_path, sqlite_url):
    import yaml

    from controller.review.failures import _features, rollout_failures
    from controller.storage.store import Store
    from policies.policy import DEFAULT_POLICY, load_policy
    from policies.probes.clip_score import ClipScorer
    from tests.test_probes import tiny_clip

    path = record_pairs(tmp_path, sqlite_url)
    policy_file = tmp_path / "policy.yaml"
    body = yaml.safe_load(DEFAULT_POLICY.read_text())
    body["clip_model"] = str(tiny_clip(tmp_path))
    policy_file.write_text(yaml.safe_dump(body))
    config = load_config(path)
    store = Store(config.resolved_database_url)
    with store.reader() as session:
        pairs = rollout_failures(
            session,
            get_rollout(session, config.name),
            load_policy(policy_file),
            config.artifact_path,
        )
    store.close()
    clip = ClipScorer(body["clip_model"])
    plain, embedded = _features(pairs, None), _features(pairs, clip)
    assert embedded.shape[1] == plain.shape[1] + clip.dimensions
    groups = cluster(pairs, clip=clip)
    assert sum(len(g.pairs) for g in groups) == 20
    assert {len(g.pairs) for g in groups} == {12, 8}  # the tags still tell the kinds apart
