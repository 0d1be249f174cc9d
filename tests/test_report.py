"""`cutover report`: a self-contained HTML file that a real headless Chromium renders safely."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.rollout.state_machine import Command, Verb
from controller.rollout.transitions import apply_command, get_rollout
from controller.storage.artifacts import store_artifact
from controller.storage.tables import Output, Request, Score, Verdict, utcnow
from tests.browser import CHROMIUM, probe_report
from tests.conftest import base_config, prepare_rollout, write_config
from tests.test_scorer import poster_png

INJECTED = "<script>document.title='pwned';window.parent.document.title='pwned'</script> a sign"


@pytest.fixture
def report_path(tmp_path):
    path = write_config(
        tmp_path, base_config(f"sqlite:///{tmp_path / 'c.db'}") | {"artifact_dir": "art"}
    )
    config, store = prepare_rollout(path)
    now = utcnow()
    with store.session() as session:
        rollout = get_rollout(session, config.name)
        for i, prompt in enumerate(['a sign that says "OPEN"', INJECTED, "a fox"]):
            request = Request(
                id=f"req{i}",
                rollout_id=rollout.id,
                stage="shadow",
                primary_role="incumbent",
                sticky_key="u",
                prompt=prompt,
                params={},
                seed=i,
                mirrored=True,
                created_at=now - timedelta(seconds=10 - i),
            )
            session.add(request)
            session.flush()
            for role, tint in (("incumbent", (0, 0, 0)), ("candidate", (40 * i, 0, 0))):
                sha = store_artifact(config.artifact_path, poster_png("OPEN", tint))
                output = Output(
                    id=f"req{i}-{role}",
                    request_id=request.id,
                    role=role,
                    image_index=0,
                    is_primary=role == "incumbent",
                    status="ok" if i < 2 or role == "incumbent" else "error",
                    error=None if i < 2 or role == "incumbent" else "RuntimeError: <b>boom</b>",
                    latency_ms=100 + 10 * i,
                    created_at=now,
                    artifact_sha256=sha,
                )
                session.add(output)
                session.flush()
                if role == "candidate" and output.status == "ok":
                    session.add(
                        Score(
                            output_id=output.id,
                            probe="colour_shift_de",
                            value=4.0 * i + 1,
                            created_at=now,
                        )
                    )
        for k in range(4):
            session.add(
                Verdict(
                    rollout_id=rollout.id,
                    stage="shadow",
                    evaluated_at=now + timedelta(seconds=k),
                    decision="FAIL" if k == 3 else "INCONCLUSIVE",
                    samples=10 * k,
                    checks=[
                        {
                            "name": "colour_shift",
                            "decision": "FAIL" if k == 3 else "INCONCLUSIVE",
                            "estimate": 5.0,
                            "lower": 1.0 + k,
                            "upper": 12.0 - k,
                            "samples": 10 * k,
                            "critical": True,
                            "reason": "colour drifts",
                        }
                    ],
                )
            )
    apply_command(
        store, config, Command(Verb.ROLLBACK, reason="colour_shift: colour drifts"), "controller"
    )
    store.close()
    out = tmp_path / "report.html"
    result = CliRunner().invoke(
        app, ["-c", str(path), "report", "--out", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return out


def test_report_is_self_contained_and_escapes_prompts(report_path):
    html = report_path.read_text()
    assert "&lt;script&gt;document.title" in html and "<script>document" not in html
    assert html.count("data:image/png;base64,") >= 4
    assert 'src="http' not in html and "<link" not in html
    for words in (
        "Timeline",
        "rollback",
        "colour_shift",
        "Latency",
        "Example failures",
        "&lt;b&gt;boom",
    ):
        assert words in html


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (make test installs it when run as root)",
)
def test_report_in_headless_chromium_loads_images_and_runs_no_injected_script(
    report_path, tmp_path
):
    result = probe_report(
        report_path,
        "{promptShownAsText: Array.from(doc.querySelectorAll('.prompt'))"
        ".some(e => e.textContent.includes('<script>'))}",
    )
    assert result["images"] >= 4 and result["loaded"] == result["images"], result
    assert (
        result["reportTitle"].startswith("cutover report") and result["wrapperTitle"] == "wrapper"
    ), result
    assert result["promptShownAsText"], result


def test_the_check_charts_read_a_bounded_spread_of_verdicts(tmp_path, db_url, monkeypatch):
    """A tick stores a verdict every interval; the report reads at most CHART_POINTS of them,
    evenly spread, always the first and the newest."""
    from controller.review import report

    config, store = prepare_rollout(write_config(tmp_path, base_config(db_url)))
    start = utcnow()
    with store.session() as session:
        rollout = get_rollout(session, config.name)
        session.add_all(
            Verdict(
                rollout_id=rollout.id,
                stage="shadow",
                evaluated_at=start + timedelta(seconds=k),
                decision="INCONCLUSIVE",
                samples=k,
                checks=[],
            )
            for k in range(95)
        )
    monkeypatch.setattr(report, "CHART_POINTS", 10)
    with store.reader() as session:
        picked = report.verdicts_evenly(session, get_rollout(session, config.name))
    samples = [v.samples for v in picked]
    assert samples == sorted(samples) and samples[0] == 0 and samples[-1] == 94
    assert 10 <= len(samples) <= 11
    store.close()
