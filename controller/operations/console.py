"""The live console and the admin API: one small FastAPI app, server-rendered, no build step.

`cutover console` serves it on its own (uvicorn); `cutover serve` starts it beside the
Ray Serve application. Every page and API call needs a token (`cutover tokens create`):
a missing or unknown one is 401, a role too low for the call is 403. The console's forms
carry a CSRF value derived from the session's token, which another site cannot compute,
and the session cookie is HttpOnly and SameSite=Strict. Every prompt is escaped (Jinja's
autoescape), and the Content-Security-Policy allows no inline script at all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from prometheus_client import generate_latest
from sqlalchemy import func, select

from controller.config import Config, ConfigError
from controller.operations import actions, tokens
from controller.operations.approvals import approval_of
from controller.operations.metrics import CONTENT_TYPE, rollout_registry
from controller.operations.tokens import Caller
from controller.review.report import check_chart, verdicts_evenly
from controller.review.shadow_log import Filters, shadow_log, worst_first
from controller.review.status import deployment_status, event_dict, rollout_status
from controller.rollout.state_machine import Refusal, human_duration
from controller.rollout.transitions import RolloutNotFound, get_rollout
from controller.storage.artifact_store import artifacts_for, ensure_local
from controller.storage.artifacts import artifact_path
from controller.storage.store import Store
from controller.storage.tables import Request as RequestRow
from controller.storage.tables import RolloutEvent, utcnow
from policies.policy import Policy, load_policy
from policies.vocabulary import Arm

log = structlog.get_logger("cutover.console")

COOKIE = "cutover_session"
# The console's own files (the script and the stylesheet), by name: nothing else is served.
STATIC = {path.name: path for path in (Path(__file__).parent / "static").iterdir()}
GALLERY_SCAN = 200  # the newest matching pairs the gallery ranks worst first
RATE_WINDOW = timedelta(minutes=10)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HttpError(Exception):
    """A refusal with its HTTP status: JSON under /api/, the sign-in page elsewhere."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def csrf_of(token: str) -> str:
    """The value the console's forms must send back: keyed by the session's own token."""
    return hmac.new(token.encode(), b"cutover-console-csrf", hashlib.sha256).hexdigest()


class Console:
    """The app's state: config, store, templates and each rollout's policy (loaded once)."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.templates = Environment(
            loader=PackageLoader("controller.operations", "templates"),
            autoescape=select_autoescape(default=True),
        )
        self.templates.filters["duration"] = human_duration
        self._policies: dict[str, Policy] = {}
        self.registry = rollout_registry(config, store)

    def policy(self, rollout: str) -> Policy:
        if rollout not in self._policies:
            self._policies[rollout] = load_policy(self.config.plan(rollout).policy_path)
        return self._policies[rollout]

    # -- who is asking -----------------------------------------------------------------

    def token_of(self, request: Request) -> tuple[str | None, bool]:
        """The request's token, and whether it came from the console's cookie."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip(), False
        return request.cookies.get(COOKIE), True

    def caller(self, request: Request, role: str = "viewer") -> Caller:
        token, _ = self.token_of(request)
        if not token:
            raise HttpError(401, "no token: sign in, or send Authorization: Bearer <token>")
        caller = tokens.caller_of(self.store, token)
        if caller is None:
            raise HttpError(401, "unknown or revoked token")
        if not caller.may(role):
            raise HttpError(
                403, f"this needs the {role} role; token {caller.name!r} has the {caller.role} role"
            )
        return caller

    def check_csrf(self, request: Request, sent: str | None) -> None:
        """Cookie-borne calls must prove they come from a console page."""
        token, from_cookie = self.token_of(request)
        if not from_cookie:
            return  # a bearer header is never sent by a browser on its own
        sent = sent or request.headers.get("x-csrf-token")
        if not token or not sent or not hmac.compare_digest(sent, csrf_of(token)):
            raise HttpError(403, "missing or wrong CSRF value: reload the page and try again")

    # -- pages ------------------------------------------------------------------------

    def render(self, name: str, request: Request, code: int = 200, **values: Any) -> HTMLResponse:
        token, from_cookie = self.token_of(request)
        html = self.templates.get_template(name).render(
            deployment=self.config.name,
            csrf=csrf_of(token) if token and from_cookie else "",
            **values,
        )
        return HTMLResponse(html, status_code=code, headers=SECURITY_HEADERS)

    def rollout_page(
        self, request: Request, caller: Caller, name: str, gallery_too: bool = True
    ) -> dict[str, Any]:
        """What the rollout page shows; `gallery_too=False` for the live fragment, which
        shows the checks and gates only."""
        policy = self.policy(name)
        query = request.query_params
        filters = Filters(
            stage=query.get("stage") or None,
            role=query.get("role") or None,
            status=query.get("status") or None,
            failing=query.get("failing") or None,
            prompt_contains=query.get("q") or None,
            before=query.get("before") or None,
            limit=GALLERY_SCAN,
        )
        with self.store.reader() as session:
            row = get_rollout(session, name)
            status = rollout_status(session, row, self.config)
            verdicts = verdicts_evenly(session, row)
            charts = [check_chart(check.name, verdicts) for check in policy.checks]
            events = session.scalars(
                select(RolloutEvent)
                .where(RolloutEvent.rollout_id == row.id)
                .order_by(RolloutEvent.version.desc())
                .limit(10)
            ).all()
            rows = (
                shadow_log(session, row, policy, filters, self.config.artifact_path)
                if gallery_too
                else []
            )
            approval = approval_of(session, row)
            eta = time_to_decision(session, row.id, status)
            plan = self.config.plan(name)
            needs_approval = plan.settings.approval_for(status["stage"]) is not None
            return {
                "status": status,
                "charts": charts,
                "events": [event_dict(e) for e in events],
                "gallery": gallery(policy, rows, query.get("sort"), self.config.console.page_size),
                "scanned": len(rows),
                "older": None
                if len(rows) < GALLERY_SCAN
                else "?"
                + urlencode(
                    {k: query[k] for k in FILTER_KEYS if query.get(k)}
                    | {"before": rows[-1]["request_id"]}
                ),
                "filters": {k: query.get(k, "") for k in FILTER_KEYS},
                "score_checks": [c.name for c in policy.checks if c.on_scores],
                "eta": eta,
                "approval": None
                if approval is None
                else {
                    "state": approval.state,
                    "by": approval.decided_by,
                    "reason": approval.reason,
                    "asks": approval.asks,
                },
                "needs_approval": needs_approval,
                "caller": caller,
                "may_operate": caller.may("operator"),
                "may_force": caller.may("admin"),
                "said": query.get("said", ""),
            }


FILTER_KEYS = ("stage", "role", "status", "failing", "q", "sort")


def gallery(
    policy: Policy, rows: list[dict[str, Any]], sort: str | None, size: int
) -> dict[str, Any]:
    """One page of pairs: ranked worst first by a score check (the one asked for, else the
    first with values), newest first when no check has any."""
    checks = [c for c in policy.checks if c.on_scores]
    if sort:
        checks = [c for c in checks if c.name == sort] or checks
    ranked: list[tuple[float | None, dict[str, Any]]] = []
    by = None
    for check in checks:
        worst = worst_first(check, rows)
        if worst:
            ranked, by = list(worst), check
            break
    if by is not None:
        seen = {id(row) for _, row in ranked}
        ranked += [(None, row) for row in rows if id(row) not in seen]
    else:
        ranked = [(None, row) for row in rows]
    return {
        "by": by.name if by else None,
        "pairs": [pair_view(value, row) for value, row in ranked[:size]],
    }


def pair_view(value: float | None, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "value": value,
        "prompt": row["prompt"],
        "request_id": row["request_id"],
        "stage": row["stage"],
        "created_at": row["created_at"],
        "tags": row.get("tags") or [],
        **{
            arm: {
                "status": row[arm]["status"],
                "model": row[arm]["model"],
                "latency_ms": row[arm]["latency_ms"],
                "image": image_url(row[arm]["artifact"]),
                "scores": row[arm]["scores"],
            }
            for arm in (Arm.INCUMBENT, Arm.CANDIDATE)
        },
    }


def image_url(path: str | None) -> str | None:
    return None if not path else f"/artifacts/{Path(path).stem}.png"


def time_to_decision(
    session: Any, rollout_id: int, status: dict[str, Any]
) -> dict[str, Any] | None:
    """When the stage waits for pairs: how long, at the last ten minutes' rate of mirrored
    requests. None when it waits for nothing the traffic can bring."""
    samples = status["gates"]["samples"]
    if samples["met"] or status["state"] not in ("shadowing", "canary"):
        return None
    since = utcnow() - RATE_WINDOW
    recent = session.scalar(
        select(func.count())
        .select_from(RequestRow)
        .where(
            RequestRow.rollout_id == rollout_id,
            RequestRow.mirrored.is_(True),
            RequestRow.created_at >= since,
        )
    )
    per_minute = (recent or 0) / (RATE_WINDOW.total_seconds() / 60)
    missing = samples["need"] - samples["have"]
    if per_minute <= 0:
        return {
            "missing": missing,
            "per_minute": 0.0,
            "eta_s": None,
            "text": f"{missing} more pairs needed; no mirrored traffic in the last 10 minutes",
        }
    eta = missing / per_minute * 60
    return {
        "missing": missing,
        "per_minute": round(per_minute, 1),
        "eta_s": round(eta),
        "text": f"{missing} more pairs needed: about {human_duration(eta)} at "
        f"{per_minute:.1f} mirrored requests a minute",
    }


def build_console(config: Config, store: Store) -> FastAPI:
    """The console app (pages, admin API, /metrics) over one config and database."""
    console = Console(config, store)
    artifacts_for(config)  # images only the object store has are fetched from it
    app = FastAPI(title="cutover console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console

    @app.exception_handler(HttpError)
    async def http_error(request: Request, exc: HttpError) -> Response:
        log.info(
            "console_refused",
            status=exc.status,
            method=request.method,
            path=request.url.path,
            reason=str(exc),
        )
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return console.render("login.html.j2", request, code=exc.status, message=str(exc))

    @app.exception_handler(RolloutNotFound)
    async def not_found(request: Request, exc: RolloutNotFound) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(ConfigError)
    async def unknown_rollout(request: Request, exc: ConfigError) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(console.registry), media_type=CONTENT_TYPE)

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        path = STATIC.get(name)
        if path is None:
            return JSONResponse({"error": "no such file"}, status_code=404)
        return FileResponse(path, headers=SECURITY_HEADERS)

    @app.get("/login")
    def login_page(request: Request) -> Response:
        return console.render("login.html.j2", request, message="")

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        token = str(form.get("token", "")).strip()
        if tokens.caller_of(store, token) is None:
            return console.render(
                "login.html.j2", request, code=401, message="unknown or revoked token"
            )
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        form = await request.form()
        console.check_csrf(request, str(form.get("csrf", "")))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        caller = console.caller(request)
        with store.reader() as session:
            status = deployment_status(session, config)
        return console.render("overview.html.j2", request, overview=status, caller=caller)

    @app.get("/rollouts/{name}", response_class=HTMLResponse)
    def rollout(request: Request, name: str) -> Response:
        caller = console.caller(request)
        page = console.rollout_page(request, caller, config.plan(name).name)
        return console.render("rollout.html.j2", request, **page)

    @app.get("/rollouts/{name}/live", response_class=HTMLResponse)
    def live(request: Request, name: str) -> Response:
        caller = console.caller(request)
        page = console.rollout_page(request, caller, config.plan(name).name, gallery_too=False)
        return console.render("_live.html.j2", request, **page)

    @app.get("/rollouts/{name}/failures", response_class=HTMLResponse)
    def failures(request: Request, name: str) -> Response:
        from controller.review.failures import cluster, rollout_failures

        caller = console.caller(request)
        plan = config.plan(name)
        with store.reader() as session:
            row = get_rollout(session, plan.name)
            failing = rollout_failures(
                session, row, console.policy(plan.name), config.artifact_path
            )
        groups = [group.as_dict() for group in cluster(failing)] if failing else []
        for group in groups:
            for pair in group["examples"]:
                pair["incumbent"] = image_url(pair["incumbent"])
                pair["candidate"] = image_url(pair["candidate"])
        return console.render(
            "failures.html.j2",
            request,
            rollout=plan.name,
            failing=len(failing),
            clusters=groups,
            caller=caller,
        )

    @app.get("/artifacts/{name}")
    def artifact(request: Request, name: str) -> Response:
        console.caller(request)
        sha = name.removesuffix(".png")
        path = ensure_local(artifact_path(config.artifact_path, sha)) if SHA256.match(sha) else None
        if path is None:
            return JSONResponse({"error": "no such image"}, status_code=404)
        return FileResponse(path, media_type="image/png", headers=SECURITY_HEADERS)

    # -- the admin API (JSON; Authorization: Bearer <token>) ----------------------------

    @app.get("/api/rollouts")
    def api_rollouts(request: Request) -> dict[str, Any]:
        console.caller(request)
        with store.reader() as session:
            return deployment_status(session, config)

    @app.get("/api/rollouts/{name}")
    def api_rollout(request: Request, name: str) -> dict[str, Any]:
        console.caller(request)
        with store.reader() as session:
            return rollout_status(session, get_rollout(session, config.plan(name).name), config)

    @app.post("/api/rollouts/{name}/approval")
    async def api_approval(request: Request, name: str) -> Response:
        """Approve or deny the stage's approval; the console's approve and deny buttons
        post their forms here."""
        fields, from_form = await _command(request)
        caller = console.caller(request)  # who first (401), then where from (CSRF), then role
        console.check_csrf(request, fields.get("csrf"))
        plan = config.plan(name)
        try:
            state = actions.decide_approval(
                store,
                config,
                caller,
                plan.name,
                str(fields.get("decision", "")),
                str(fields.get("reason", "")).strip(),
            )
        except actions.Forbidden as exc:
            raise HttpError(403, str(exc)) from None
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        if from_form:
            return back_to(plan.name, f"approval {state}")
        return JSONResponse({"state": state, "actor": caller.actor})

    @app.post("/api/rollouts/{name}/{verb}")
    async def api_act(request: Request, name: str, verb: str) -> Response:
        """Apply a verb; the console's buttons post their forms here (answered with a
        redirect back to the rollout's page, saying what happened)."""
        fields, from_form = await _command(request)
        caller = console.caller(request)  # who first (401), then where from (CSRF), then role
        console.check_csrf(request, fields.get("csrf"))
        plan = config.plan(name)
        try:
            result = actions.act(
                store,
                config,
                caller,
                plan.name,
                verb,
                reason=str(fields.get("reason", "")).strip(),
                force=fields.get("force") in (True, "on"),
                to=fields.get("to") or None,
                expected_stage=fields.get("expected_stage") or None,
            )
        except actions.Forbidden as exc:
            raise HttpError(403, str(exc)) from None
        except ValueError as exc:
            return JSONResponse(
                {"error": str(exc), "verbs": sorted(actions.VERB_ROLES)}, status_code=404
            )
        if isinstance(result, Refusal):
            if from_form:
                return back_to(plan.name, f"refused: {result.reason}")
            return JSONResponse(
                {"refused": result.reason, "kind": result.kind, "details": result.details},
                status_code=409,
            )
        if from_form:
            return back_to(
                plan.name,
                f"{verb}: {result.from_state}@{result.from_stage} → "
                f"{result.to_state}@{result.to_stage}",
            )
        return JSONResponse(
            {
                "applied": verb,
                "actor": caller.actor,
                "from": f"{result.from_state}@{result.from_stage}",
                "to": f"{result.to_state}@{result.to_stage}",
                "version": result.version,
                "forced": result.forced,
            }
        )

    return app


def back_to(rollout: str, said: str) -> Response:
    return RedirectResponse(
        f"/rollouts/{quote(rollout)}?{urlencode({'said': said})}", status_code=303
    )


async def _command(request: Request) -> tuple[dict[str, Any], bool]:
    """An admin call's fields, from a JSON body (API clients) or a form (the console's
    buttons); and whether it was a form."""
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        form = await request.form()
        return {key: str(value) for key, value in form.items()}, True
    raw = await request.body()
    if not raw:
        return {}, False
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise HttpError(422, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(422, "body must be a JSON object")
    return body, False
