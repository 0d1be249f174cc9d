"""The operations surface from the command line: API tokens, the console, stage approvals."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from controller.cli.core import (
    Refused,
    RolloutOpt,
    app,
    cli_config,
    err,
    guarded,
    open_store,
    out,
)
from controller.operations import approvals, tokens

tokens_app = typer.Typer(help="Tokens for the console and the admin API.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens", rich_help_panel="Operations")


@tokens_app.command("create")
def tokens_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="Who holds it: the actor it records.")],
    role: Annotated[str, typer.Option("--role", help="viewer, operator or admin.")],
) -> None:
    """Create a token and print it once (only its hash is stored)."""

    def run() -> None:
        config = cli_config(ctx)
        with open_store(config) as store:
            store.require_schema()
            try:
                token = tokens.create(store, name, role, ctx.obj.actor)
            except tokens.TokenError as exc:
                raise Refused(str(exc)) from None
        # The token alone on stdout (for `$(cutover tokens create ...)`); the note on stderr.
        sys.stdout.write(token + "\n")
        err.print(f"token {name} ({role}) created; it is not shown again")

    guarded(run)


@tokens_app.command("list")
def tokens_list(ctx: typer.Context) -> None:
    """Every token: name, role, who created it, whether revoked (never the token)."""

    def run() -> None:
        config = cli_config(ctx)
        with open_store(config) as store:
            store.require_schema()
            sys.stdout.write(json.dumps(tokens.listed(store), indent=1) + "\n")

    guarded(run)


@tokens_app.command("revoke")
def tokens_revoke(
    ctx: typer.Context, name: Annotated[str, typer.Option("--name", help="The token's name.")]
) -> None:
    """Revoke a token: the console and the API refuse it from now on (401)."""

    def run() -> None:
        config = cli_config(ctx)
        with open_store(config) as store:
            store.require_schema()
            try:
                tokens.revoke(store, name)
            except tokens.TokenError as exc:
                raise Refused(str(exc)) from None
        out.print(f"token {name} revoked")

    guarded(run)


def _decide(ctx: typer.Context, rollout: str | None, decision: str, reason: str) -> None:
    def run() -> None:
        config = cli_config(ctx)
        name = config.plan(rollout).name
        with open_store(config) as store:
            store.require_schema()
            try:
                stage, state = approvals.decide_current(
                    store, config, name, decision, ctx.obj.actor, reason
                )
            except ValueError as exc:
                raise Refused(f"{name}: {exc}") from None
        out.print(f"{name} stage {stage}: approval {state} by {ctx.obj.actor}")

    guarded(run)


ReasonOpt = Annotated[str, typer.Option("--reason", help="Why, for the audit trail.")]


@app.command(rich_help_panel="Rollout")
def approve(ctx: typer.Context, rollout: RolloutOpt = None, reason: ReasonOpt = "") -> None:
    """Approve the current stage (one with `approval:`), whatever its webhook said."""
    _decide(ctx, rollout, "approve", reason)


@app.command(rich_help_panel="Rollout")
def deny(ctx: typer.Context, rollout: RolloutOpt = None, reason: ReasonOpt = "") -> None:
    """Deny the current stage's approval: it holds until someone approves it."""
    _decide(ctx, rollout, "deny", reason)


@app.command(rich_help_panel="Operations")
def console(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Default: console.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: console.port.")] = None,
    notify: Annotated[
        bool, typer.Option(help="Also deliver notifications from this process.")
    ] = False,
) -> None:
    """Serve the live web console, the admin API and the rollouts' /metrics on their own."""
    import uvicorn

    from controller.operations.background import start_notifier
    from controller.operations.console import build_console

    def run() -> None:
        config = cli_config(ctx)
        with open_store(config) as store:
            store.require_schema()
            notifier = start_notifier(config, store) if notify else None
            where = (host or config.console.host, port or config.console.port)
            out.print(f"console on http://{where[0]}:{where[1]}/ (Ctrl-C stops)")
            try:
                uvicorn.run(
                    build_console(config, store), host=where[0], port=where[1], log_level="warning"
                )
            finally:
                if notifier is not None:
                    notifier.stop()

    guarded(run)
