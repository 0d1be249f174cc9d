"""The release engineer's verbs: create the rollout, then move it (every move a compare-and-swap).

Each verb is one `Command` applied by `controller.transitions.apply_command`; a
refusal (gates unmet, wrong state, stale --from) exits 2 with the reason.
"""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy import select

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
from controller.config import Config
from controller.rollout.state_machine import Command, Refusal, Verb
from controller.rollout.transitions import apply_command, create_rollout, get_rollout
from controller.storage.store import Store
from controller.storage.tables import Rollout

SkipValidationOpt = Annotated[
    bool,
    typer.Option(
        "--skip-validation",
        help="Start without a passing `cutover validate` (needs --reason; recorded as forced).",
    ),
]


@app.command(rich_help_panel="Rollout")
def init(
    ctx: typer.Context,
    skip_validation: SkipValidationOpt = False,
    reason: Annotated[str, typer.Option("--reason", help="Why, with --skip-validation.")] = "",
) -> None:
    """Create the database tables (migrations) and every rollout the config describes; a new
    rollout needs its candidate's passing validation (`cutover validate`)."""

    def run() -> None:
        config = cli_config(ctx)
        with open_store(config) as store:
            store.upgrade()
            if not config.plans():
                out.print(f"database ready ({store.safe_url}); the config has no rollout yet")
            notes: dict[str, tuple[str, bool]] = {}
            for plan in config.plans().values():
                with store.reader() as session:
                    if session.scalars(select(Rollout.id).where(Rollout.name == plan.name)).first():
                        continue
                notes[plan.name] = _validation_gate(
                    ctx, store, config, plan.name, "init", skip_validation, reason
                )
            for plan in config.plans().values():
                note, skipped = notes.get(plan.name, ("", False))
                row, created = create_rollout(
                    store, config, ctx.obj.actor, plan.name, note=note, forced=skipped
                )
                stored = [name for name, _ in row.stages]
                wanted = [s.name for s in plan.stages]
                if created:
                    out.print(
                        f"created rollout [bold]{row.name}[/bold] on route {row.route} at stage "
                        f"{stored[0]} ({store.safe_url})"
                    )
                    continue
                out.print(
                    f"rollout [bold]{row.name}[/bold] already exists: {row.state} at stage "
                    f"{stored[row.stage_index]} (nothing changed)"
                )
                if stored != wanted:
                    err.print(
                        f"[yellow]warning:[/yellow] the stored stages {stored} of {row.name} differ "
                        f"from the config's {wanted}; the stored ones stay in force. Use a new "
                        "rollout name to change them."
                    )

    guarded(run)


def _act(
    ctx: typer.Context,
    command: Command,
    rollout: str | None,
    expected_stage: str | None = None,
) -> None:
    def run() -> None:
        config = cli_config(ctx)
        name = config.plan(rollout).name
        with open_store(config) as store:
            store.require_schema()
            result = apply_command(
                store, config, command, ctx.obj.actor, rollout=name, expected_stage=expected_stage
            )
        if isinstance(result, Refusal):
            raise Refused(f"{name}: {result.reason}")
        forced = " [yellow](forced)[/yellow]" if result.forced else ""
        out.print(
            f"{name} {command.verb.value}: {result.from_state}@{result.from_stage} → "
            f"[bold]{result.to_state}@{result.to_stage}[/bold]{forced} (event {result.version}: {result.reason})",
            soft_wrap=True,
        )

    guarded(run)


ReasonOpt = Annotated[str, typer.Option("--reason", help="Why, for the audit trail.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Override unmet gates (needs --reason; recorded).")
]


@app.command(rich_help_panel="Rollout")
def advance(
    ctx: typer.Context,
    to: Annotated[str | None, typer.Option("--to", help="Jump to this later stage.")] = None,
    force: ForceOpt = False,
    reason: ReasonOpt = "",
    from_stage: Annotated[
        str | None, typer.Option("--from", help="Only if the rollout is still at this stage.")
    ] = None,
    rollout: RolloutOpt = None,
) -> None:
    """Move to the next stage (or --to a later one) once the stage's gates are met."""
    _act(
        ctx,
        Command(Verb.ADVANCE, reason=reason, force=force, to=to),
        rollout,
        expected_stage=from_stage,
    )


@app.command(rich_help_panel="Rollout")
def promote(
    ctx: typer.Context,
    full: Annotated[
        bool, typer.Option("--full", help="Skip the remaining stages: straight to 100%.")
    ] = False,
    force: ForceOpt = False,
    reason: ReasonOpt = "",
    rollout: RolloutOpt = None,
) -> None:
    """Advance one stage, or with --full straight to the last stage (gates still apply)."""

    def run() -> str | None:
        if not full:
            return None
        config = cli_config(ctx)
        name = config.plan(rollout).name
        with open_store(config) as store, store.reader() as session:
            return [stage for stage, _ in get_rollout(session, name).stages][-1]

    _act(ctx, Command(Verb.ADVANCE, reason=reason, force=force, to=guarded(run)), rollout)


@app.command(rich_help_panel="Rollout")
def pause(ctx: typer.Context, reason: ReasonOpt = "", rollout: RolloutOpt = None) -> None:
    """Freeze the rollout where it is (traffic split unchanged)."""
    _act(ctx, Command(Verb.PAUSE, reason=reason), rollout)


@app.command(rich_help_panel="Rollout")
def resume(ctx: typer.Context, reason: ReasonOpt = "", rollout: RolloutOpt = None) -> None:
    """Continue a paused rollout."""
    _act(ctx, Command(Verb.RESUME, reason=reason), rollout)


@app.command(rich_help_panel="Rollout")
def rollback(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option("--reason", help="Why (required).")],
    rollout: RolloutOpt = None,
) -> None:
    """Send all of the route's traffic back to the incumbent and stop mirroring."""
    _act(ctx, Command(Verb.ROLLBACK, reason=reason), rollout)


@app.command(rich_help_panel="Rollout")
def retry(
    ctx: typer.Context,
    reason: ReasonOpt = "",
    rollout: RolloutOpt = None,
    skip_validation: SkipValidationOpt = False,
) -> None:
    """Start a rolled-back rollout again from the first stage; like `init`, it needs the
    candidate's passing validation on the current suites."""

    def gate() -> tuple[str, bool]:
        config = cli_config(ctx)
        name = config.plan(rollout).name
        with open_store(config) as store:
            store.require_schema()
            with store.reader() as session:
                if get_rollout(session, name).state != "rolled_back":
                    return "", False  # the state machine refuses the retry and says why
            return _validation_gate(ctx, store, config, name, "retry", skip_validation, reason)

    note, skipped = guarded(gate)
    text = "; ".join(part for part in (reason, note) if part)
    _act(ctx, Command(Verb.RETRY, reason=text, force=skipped), rollout)


def _validation_gate(
    ctx: typer.Context,
    store: Store,
    config: Config,
    name: str,
    verb: str,
    skip: bool,
    reason: str,
) -> tuple[str, bool]:
    """What the start's event says of the validation it rests on, and whether the start is
    forced (a recorded skip); refuses when there is neither a PASS nor a skip."""
    from controller.lab.validation import (
        SKIPPED,
        passing,
        record,
        refusal,
        route_suites,
        suite_versions,
    )

    plan = config.plan(name)
    suites = suite_versions(route_suites(config, plan))
    with store.reader() as session:
        found = passing(session, config, plan, suites)
        if found is None and not skip:
            raise Refused(refusal(session, config, plan, verb, suites))
    if found is not None:
        listed = ", ".join(f"{k} v{v}" for k, v in found.suites.items())
        return f"validation {found.id} PASS on {listed}", False
    if not reason.strip():
        raise Refused(f"--skip-validation needs --reason so the audit trail says why ({name})")
    row = record(store, config, plan, suites, SKIPPED, reason, ctx.obj.actor)
    err.print(
        f"[yellow]warning:[/yellow] {name}: validation skipped (recorded as forced, {row.id})"
    )
    return f"validation skipped by {ctx.obj.actor}: {reason}", True


@app.command(rich_help_panel="Rollout")
def finalize(ctx: typer.Context, reason: ReasonOpt = "", rollout: RolloutOpt = None) -> None:
    """Make the promoted candidate the incumbent; the rollout ends."""
    _act(ctx, Command(Verb.FINALIZE, reason=reason), rollout)


@app.command(rich_help_panel="Rollout")
def abort(ctx: typer.Context, reason: ReasonOpt = "", rollout: RolloutOpt = None) -> None:
    """End the rollout for good, all traffic on the incumbent."""
    _act(ctx, Command(Verb.ABORT, reason=reason), rollout)
