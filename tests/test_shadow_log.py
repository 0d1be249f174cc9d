"""`cutover shadow-log`: each filter returns exactly the pairs it names, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.rollout.transitions import get_rollout
from controller.storage.tables import Output, Request, Score, utcnow
from tests.conftest import base_config, prepare_rollout, write_config

# name: (minutes ago, stage, served by, prompt, incumbent (status, ms), candidate (status, ms), candidate scores,
#        incumbent scores)
PAIRS = {
    "r1": (
        180,
        "shadow",
        "incumbent",
        'a sign that says "OPEN"',
        ("ok", 100),
        ("ok", 110),
        {"colour_shift_de": 12.0},
        {},
    ),
    "r2": (
        120,
        "shadow",
        "incumbent",
        'a poster that says "SALE"',
        ("ok", 100),
        ("ok", 105),
        {"colour_shift_de": 2.0, "typography_cer": 0.6},
        {"typography_cer": 0.0},
    ),
    "r3": (60, "10", "candidate", "a fox in the snow", ("ok", 100), ("error", 20), {}, {}),
    "r4": (30, "10", "incumbent", "a bowl of ramen", ("ok", 100), ("oom", 30), {}, {}),
    "r5": (
        10,
        "30",
        "candidate",
        "a lighthouse at dusk",
        ("ok", 100),
        ("ok", 500),
        {"colour_shift_de": 1.0, "typography_cer": 0.1},  # worse, but not past the tail's 0.3
        {"typography_cer": 0.0},
    ),
    "r6": (
        5,
        "30",
        "incumbent",
        "<script>alert(1)</script> poster",
        ("error", 50),
        ("ok", 100),
        {"colour_shift_de": 1.5},
        {},
    ),
}


@pytest.fixture
def config_path(tmp_path, db_url):
    path = write_config(tmp_path, base_config(db_url))
    config, store = prepare_rollout(path)
    now = utcnow()
    with store.session() as session:
        rollout = get_rollout(session, config.name)
        for name, (ago, stage, served, prompt, inc, cand, cand_scores, inc_scores) in PAIRS.items():
            session.add(
                Request(
                    id=name,
                    rollout_id=rollout.id,
                    stage=stage,
                    primary_role=served,
                    sticky_key="u",
                    prompt=prompt,
                    params={},
                    seed=1,
                    mirrored=True,
                    created_at=now - timedelta(minutes=ago),
                )
            )
            session.flush()
            for role, (status, ms), scores in (
                ("incumbent", inc, inc_scores),
                ("candidate", cand, cand_scores),
            ):
                output = Output(
                    id=f"{name}-{role}",
                    request_id=name,
                    role=role,
                    image_index=0,
                    is_primary=role == served,
                    status=status,
                    latency_ms=ms,
                    created_at=now,
                    error=None if status == "ok" else f"{status} here",
                )
                session.add(output)
                session.flush()
                for probe, value in scores.items():
                    session.add(
                        Score(output_id=output.id, probe=probe, value=value, created_at=now)
                    )
    store.close()
    return path


def ids(path, *args):
    result = CliRunner().invoke(
        app, ["-c", str(path), "shadow-log", "--json", *args], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line)["request_id"] for line in result.stdout.splitlines()]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), ["r6", "r5", "r4", "r3", "r2", "r1"]),
        (("--since", "45m"), ["r6", "r5", "r4"]),
        (("--stage", "10"), ["r4", "r3"]),
        (("--role", "candidate"), ["r5", "r3"]),
        (("--status", "error"), ["r6", "r3"]),
        (("--status", "oom"), ["r4"]),
        (("--failing", "error_rate"), ["r3"]),
        (("--failing", "oom_rate"), ["r4"]),
        (("--failing", "colour_shift"), ["r1"]),
        (("--failing", "typography_cer"), ["r5", "r2"]),
        (("--failing", "typography_tail"), ["r2"]),
        (("--failing", "colour_tail"), ["r1"]),
        (("--failing", "latency_p95"), ["r5"]),
        (("--prompt-contains", "says"), ["r2", "r1"]),
        (("--prompt-contains", "<script>"), ["r6"]),
        (("--prompt-contains", "100%"), []),
        (("--limit", "2"), ["r6", "r5"]),
        (("--stage", "30", "--role", "candidate"), ["r5"]),
    ],
)
def test_filters_return_exactly_the_named_rows(config_path, args, expected):
    assert ids(config_path, *args) == expected


def test_rows_carry_both_sides_scores_and_artifacts(config_path):
    result = CliRunner().invoke(
        app, ["-c", str(config_path), "shadow-log", "--json", "--failing", "typography_tail"]
    )
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["candidate"]["scores"] == {"colour_shift_de": 2.0, "typography_cer": 0.6}
    assert row["incumbent"]["scores"] == {"typography_cer": 0.0}
    assert (row["incumbent"]["latency_ms"], row["candidate"]["latency_ms"]) == (100, 105)
    assert row["prompt"] == 'a poster that says "SALE"' and row["stage"] == "shadow"


def test_table_output_and_refusals(config_path):
    runner = CliRunner()
    table = runner.invoke(app, ["-c", str(config_path), "shadow-log", "--status", "error"])
    assert table.exit_code == 0 and "shadow log (2 pairs" in table.stdout
    assert "r6" in table.stdout and "r3" in table.stdout and "error" in table.stdout
    unknown = runner.invoke(app, ["-c", str(config_path), "shadow-log", "--failing", "nope"])
    assert (
        unknown.exit_code == 2
        and "no check named 'nope'" in unknown.stderr
        and "error_rate" in unknown.stderr
    )
    bad_since = runner.invoke(app, ["-c", str(config_path), "shadow-log", "--since", "yesterday"])
    assert bad_since.exit_code == 2 and "--since" in bad_since.stderr


def test_a_listing_cut_at_the_limit_says_so_and_names_the_next_page(config_path):
    runner = CliRunner()
    base = ["-c", str(config_path), "shadow-log", "--json"]
    everything = [json.loads(x) for x in runner.invoke(app, base).stdout.splitlines()]
    assert len(everything) == 6
    pages, before = [], []
    while True:
        page = runner.invoke(app, [*base, "--limit", "2", *before])
        assert page.exit_code == 0, page.stderr
        pages.append([json.loads(x) for x in page.stdout.splitlines()])
        if "next page" not in page.stderr:
            break
        assert "showing 2 pairs, newest first; more match" in page.stderr
        before = ["--before", pages[-1][-1]["request_id"]]
    # Keyset pages: together they are the whole listing, in order, nothing twice.
    assert [r["request_id"] for p in pages for r in p] == [r["request_id"] for r in everything]
    assert [len(p) for p in pages] == [2, 2, 2]
    failing = runner.invoke(
        app, ["-c", str(config_path), "shadow-log", "--status", "error", "--limit", "1"]
    )
    assert "showing 1 pairs, newest first; more match" in failing.stderr
    whole = runner.invoke(app, ["-c", str(config_path), "shadow-log", "--limit", "6"])
    assert whole.exit_code == 0 and "showing" not in whole.stderr  # nothing was cut
    unknown = runner.invoke(app, [*base, "--before", "no-such-request"])
    assert unknown.exit_code == 2 and "--before 'no-such-request'" in unknown.stderr
