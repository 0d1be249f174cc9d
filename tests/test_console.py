"""The console and the admin API: tokens and roles, CSRF, escaping, in a real Chromium.

The browser tests drive the console served by uvicorn on a free port, through Debian's
Chromium (playwright with `executable_path`; it downloads no browser).
"""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from bench.pairs import seed_pairs
from controller.cli import app as cli
from controller.operations import tokens
from controller.operations.background import serve_console
from controller.operations.console import build_console, csrf_of
from controller.rollout.transitions import get_rollout
from controller.serving.app import free_port
from tests.conftest import base_config, prepare_rollout, write_config
from tests.test_loop import events

SCRIPT_PROMPT = '<script>document.title="pwned"</script> a sign that says "OPEN"'
PROMPTS = [f"a fox number {i}" for i in range(7)] + [SCRIPT_PROMPT]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def make_site(tmp_path, db_url):
    path = write_config(tmp_path, base_config(db_url))
    config, store = prepare_rollout(path)
    seed_pairs(config, store, PROMPTS)
    made = {
        name: tokens.create(store, name, role, "tester")
        for name, role in (("vera", "viewer"), ("otto", "operator"), ("ada", "admin"))
    }
    return path, config, store, made


@pytest.fixture
def site(tmp_path, db_url):
    path, config, store, made = make_site(tmp_path, db_url)
    yield path, config, store, made
    store.close()


def bearer(token):
    return {"authorization": f"Bearer {token}"}


def test_no_token_is_401_a_low_role_is_403_and_the_actor_is_the_token(site):
    _, config, store, made = site
    client = TestClient(build_console(config, store))
    name = config.name
    assert client.get("/").status_code == 401
    assert client.get("/api/rollouts").status_code == 401
    assert client.get("/api/rollouts", headers=bearer("cut_nonsense")).status_code == 401
    # An action without a token is 401 too (not a CSRF refusal), and moves nothing.
    assert client.post(f"/api/rollouts/{name}/pause", json={"reason": "x"}).status_code == 401
    approval = client.post(f"/api/rollouts/{name}/approval", json={"decision": "approve"})
    assert approval.status_code == 401
    assert client.get("/api/rollouts", headers=bearer(made["vera"])).status_code == 200
    refused = client.post(f"/api/rollouts/{name}/pause", headers=bearer(made["vera"]), json={})
    assert refused.status_code == 403 and "operator role" in refused.json()["error"]
    ok = client.post(
        f"/api/rollouts/{name}/pause", headers=bearer(made["otto"]), json={"reason": "look"}
    )
    assert ok.status_code == 200 and ok.json()["actor"] == "token:otto"
    resumed = client.post(f"/api/rollouts/{name}/resume", headers=bearer(made["otto"]), json={})
    assert resumed.status_code == 200
    # The stage's gates are unmet (no verdict): advancing needs --force, which needs admin.
    held = client.post(f"/api/rollouts/{name}/advance", headers=bearer(made["otto"]), json={})
    assert held.status_code == 409 and held.json()["kind"] == "gates"
    forced = {"reason": "override", "force": True}
    assert (
        client.post(f"/api/rollouts/{name}/advance", headers=bearer(made["otto"]), json=forced)
    ).status_code == 403
    assert (
        client.post(f"/api/rollouts/{name}/advance", headers=bearer(made["ada"]), json=forced)
    ).status_code == 200
    trail = [(e.verb, e.actor, e.forced) for e in events(store, config)]
    assert trail[1:] == [
        ("pause", "token:otto", False),
        ("resume", "token:otto", False),
        ("advance", "token:ada", True),
    ]
    tokens.revoke(store, "otto")
    assert client.get("/api/rollouts", headers=bearer(made["otto"])).status_code == 401


def test_console_forms_need_the_csrf_value_of_their_session(site):
    _, config, store, made = site
    client = TestClient(build_console(config, store))
    client.cookies.set("cutover_session", made["otto"])
    url = f"/api/rollouts/{config.name}/pause"
    form = {"reason": "x"}
    assert client.post(url, data=form, follow_redirects=False).status_code == 403
    wrong = form | {"csrf": csrf_of(made["ada"])}
    assert client.post(url, data=wrong, follow_redirects=False).status_code == 403
    assert [e.verb for e in events(store, config)] == ["init"], "nothing moved"
    right = form | {"csrf": csrf_of(made["otto"])}
    moved = client.post(url, data=right, follow_redirects=False)
    assert moved.status_code == 303 and "paused" in moved.headers["location"]
    assert [e.actor for e in events(store, config)] == ["tester", "token:otto"]


def test_pages_escape_prompts_and_forbid_inline_script(site):
    _, config, store, made = site
    client = TestClient(build_console(config, store))
    page = client.get(f"/rollouts/{config.name}", headers=bearer(made["vera"]))
    assert page.status_code == 200
    assert SCRIPT_PROMPT not in page.text
    assert "&lt;script&gt;document.title=&#34;pwned&#34;&lt;/script&gt;" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'id="advance"' not in page.text  # a viewer has no buttons
    assert page.text.count('<div class="pair">') == len(PROMPTS)


def test_metrics_of_the_rollouts_parse_with_bounded_labels(site):
    from prometheus_client.parser import text_string_to_metric_families

    _, config, store, _ = site
    client = TestClient(build_console(config, store))
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    state = families["cutover_rollout_state"].samples
    assert [(s.labels["rollout"], s.labels["state"], s.value) for s in state] == [
        (config.name, "shadowing", 1.0)
    ]
    assert families["cutover_rollout_candidate_weight"].samples[0].value == 0.0
    assert "cutover_scorer_lag_seconds" in families


browser = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (`make system-packages` installs it)"
)


@pytest.fixture
def live_site(tmp_path, sqlite_url):
    path, config, store, made = make_site(tmp_path, sqlite_url)
    server = serve_console(config, store, "127.0.0.1", free_port())
    yield path, config, store, made, server.url
    server.stop()
    store.close()


@pytest.fixture
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield instance
        instance.close()


def sign_in(chromium, url, token):
    page = chromium.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url + "/login")
    page.fill("#token", token)
    page.click("#sign-in")
    page.wait_for_selector("#rollouts")
    return page, dialogs


@browser
def test_a_viewer_sees_the_gallery_cannot_advance_and_the_api_says_403(live_site, chromium):
    _, config, _, made, url = live_site
    page, dialogs = sign_in(chromium, url, made["vera"])
    page.click(f"#rollouts a:text('{config.name}')")
    page.wait_for_selector("#gallery")
    loaded = page.evaluate(
        "Array.from(document.querySelectorAll('#gallery img'))"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )
    assert loaded == 2 * len(PROMPTS)
    assert page.locator("#advance").count() == 0
    assert "may read only" in page.inner_text("#read-only")
    # The prompt with a script tag is text on the page, and ran nothing.
    assert SCRIPT_PROMPT in page.inner_text("#gallery")
    assert page.title() != "pwned" and dialogs == []
    # Pressing advance anyway, through the API with the session and its CSRF value: 403.
    answer = page.evaluate(
        """async (name) => {
          const csrf = document.querySelector('input[name=csrf]').value;
          const r = await fetch('/api/rollouts/' + name + '/advance', {method: 'POST',
            headers: {'X-CSRF-Token': csrf, 'content-type': 'application/json'}, body: '{}'});
          return {status: r.status, body: await r.json()};
        }""",
        config.name,
    )
    assert answer["status"] == 403 and "operator role" in answer["body"]["error"]


@browser
def test_an_operators_rollback_shows_in_history_under_their_token_name(live_site, chromium):
    path, config, _, made, url = live_site
    page, _ = sign_in(chromium, url, made["otto"])
    page.goto(f"{url}/rollouts/{config.name}")
    page.fill("#reason-rollback", "colour drift on the gallery")
    page.click("#rollback")
    page.wait_for_selector("#said")
    assert "rollback: shadowing@shadow → rolled_back@shadow" in page.inner_text("#said")
    history = CliRunner().invoke(cli, ["-c", str(path), "history", "--json"])
    assert history.exit_code == 0, history.output
    last = json.loads(history.output.strip().splitlines()[-1])
    assert (last["verb"], last["actor"], last["reason"]) == (
        "rollback",
        "token:otto",
        "colour drift on the gallery",
    )


def test_tokens_are_printed_once_and_only_their_hash_is_stored(tmp_path, sqlite_url):
    from controller.storage.tables import ApiToken

    path = write_config(tmp_path, base_config(sqlite_url))
    config, store = prepare_rollout(path)
    runner = CliRunner()
    made = runner.invoke(
        cli, ["-c", str(path), "tokens", "create", "--name", "otto", "--role", "operator"]
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[0]
    assert token.startswith("cut_") and len(token) > 40
    with store.reader() as session:
        row = session.scalars(select(ApiToken)).one()
        assert (row.name, row.role) == ("otto", "operator")
        assert row.token_hash == tokens.digest(token) and token not in repr(row.__dict__)
    listed = runner.invoke(cli, ["-c", str(path), "tokens", "list"])
    assert '"otto"' in listed.stdout and token not in listed.stdout
    again = runner.invoke(
        cli, ["-c", str(path), "tokens", "create", "--name", "otto", "--role", "admin"]
    )
    assert again.exit_code == 2 and "a token named 'otto' exists" in again.output
    wrong = runner.invoke(
        cli, ["-c", str(path), "tokens", "create", "--name", "x", "--role", "root"]
    )
    assert (
        wrong.exit_code == 2 and "role 'root' is not one of viewer, operator, admin" in wrong.output
    )
    assert (
        runner.invoke(cli, ["-c", str(path), "tokens", "revoke", "--name", "otto"]).exit_code == 0
    )
    assert tokens.caller_of(store, token) is None
    store.close()


def test_status_shows_where_each_receivers_notifications_stand(tmp_path, sqlite_url):
    data = base_config(sqlite_url)
    data["notifications"] = {"receivers": [{"name": "ops", "url": "http://127.0.0.1:9/hook"}]}
    path = write_config(tmp_path, data)
    _, store = prepare_rollout(path)
    store.close()
    shown = CliRunner().invoke(cli, ["-c", str(path), "status", "--json"])
    assert shown.exit_code == 0, shown.output
    (receiver,) = json.loads(shown.stdout)["notifications"]
    assert (receiver["receiver"], receiver["delivered"], receiver["pending"]) == ("ops", 0, 1)
    table = CliRunner().invoke(cli, ["-c", str(path), "status"], env={"COLUMNS": "200"})
    assert "notifications" in table.stdout and "ops" in table.stdout


def test_time_to_decision_is_the_missing_pairs_at_the_recent_rate(tmp_path, sqlite_url):
    from controller.operations.console import time_to_decision
    from controller.review.status import rollout_status

    path = write_config(tmp_path, base_config(sqlite_url, min_samples=50))
    config, store = prepare_rollout(path)
    with store.reader() as session:
        row = get_rollout(session, config.name)
        status = rollout_status(session, row, config)
        idle = time_to_decision(session, row.id, status)
    assert idle["eta_s"] is None and "no mirrored traffic" in idle["text"]
    seed_pairs(config, store, [f"a fox {i}" for i in range(20)])  # within the last minute
    with store.reader() as session:
        status = rollout_status(session, row, config)
        eta = time_to_decision(session, row.id, status)
    missing = 50 - status["gates"]["samples"]["have"]
    assert eta["missing"] == missing and eta["per_minute"] == 2.0  # 20 in the 10-minute window
    assert eta["eta_s"] == missing / 2 * 60
    assert f"{missing} more pairs needed: about {missing // 2}m" in eta["text"]
    store.close()


def test_the_grafana_dashboard_uses_only_series_cutover_exports(site):
    """Every `cutover_*` name in docs/grafana-dashboard.json is a series the router or the
    console's /metrics exports (a renamed metric breaks the dashboard, and this test)."""
    import re
    from pathlib import Path
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from controller.operations.metrics import RouterMetrics
    from controller.storage.recorder import Counters

    _, config, store, _ = site
    router = RouterMetrics(
        SimpleNamespace(counters=Counters(), queue_depth=0), SimpleNamespace(mirrors_in_flight=0)
    )
    exported = {f.name for f in text_string_to_metric_families(router.render().decode())}
    console = TestClient(build_console(config, store)).get("/metrics").text
    exported |= {f.name for f in text_string_to_metric_families(console)}
    dashboard = json.loads(
        (Path(__file__).parents[1] / "docs" / "grafana-dashboard.json").read_text()
    )
    used = {
        re.sub(r"_(bucket|total|count|sum)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"cutover_[a-z_]+", target["expr"])
    }
    assert len(used) >= 15
    assert used <= exported, used - exported
