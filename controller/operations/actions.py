"""What a console or admin-API caller may do to a rollout, by role, recorded under their name.

The same `apply_command` the CLI uses moves the rollout, so the gates, the refusals and
the compare-and-swap are the CLI's; only who may ask differs. The actor in the audit
trail is the token's name (`token:<name>`).
"""

from __future__ import annotations

from controller.config import Config
from controller.operations import approvals
from controller.operations.tokens import Caller
from controller.rollout.state_machine import Command, Refusal, Verb
from controller.rollout.transitions import Applied, apply_command
from controller.storage.store import Store

# The role each verb needs; `--force` on any verb needs admin. `retry` is not here: it
# starts a rollout again, which needs the candidate's validation (`cutover retry`).
VERB_ROLES = {
    Verb.ADVANCE: "operator",
    Verb.PAUSE: "operator",
    Verb.RESUME: "operator",
    Verb.ROLLBACK: "operator",
    Verb.FINALIZE: "operator",
    Verb.ABORT: "admin",
}


class Forbidden(Exception):
    """The caller's role does not allow this (HTTP 403)."""


def required_role(verb: Verb, force: bool) -> str:
    return "admin" if force else VERB_ROLES[verb]


def act(
    store: Store,
    config: Config,
    caller: Caller,
    rollout: str,
    verb: str,
    *,
    reason: str = "",
    force: bool = False,
    to: str | None = None,
    expected_stage: str | None = None,
) -> Applied | Refusal:
    """Apply `verb` for `caller`; raise Forbidden when their role does not allow it."""
    command_verb = Verb(verb)
    if command_verb not in VERB_ROLES:
        raise ValueError(f"{verb} is not offered here; use `cutover {verb}`")
    need = required_role(command_verb, force)
    if not caller.may(need):
        raise Forbidden(
            f"{verb}{' --force' if force else ''} needs the {need} role; "
            f"token {caller.name!r} has the {caller.role} role"
        )
    return apply_command(
        store,
        config,
        Command(command_verb, reason=reason, force=force, to=to),
        caller.actor,
        rollout=rollout,
        expected_stage=expected_stage,
    )


def decide_approval(
    store: Store, config: Config, caller: Caller, rollout: str, decision: str, reason: str
) -> str:
    """An operator's approve or deny of the current stage's approval; returns its state."""
    if not caller.may("operator"):
        raise Forbidden(
            f"deciding an approval needs the operator role; token {caller.name!r} has the "
            f"{caller.role} role"
        )
    _, state = approvals.decide_current(
        store, config, config.plan(rollout).name, decision, caller.actor, reason
    )
    return state
