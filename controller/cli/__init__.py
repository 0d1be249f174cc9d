"""`cutover`: the release engineer's verbs, over the same SQL the router and loop use.

One module per concern, each registering its commands on the one Typer app in
`core`: rollout verbs, state views (status, history), database migrations,
models, serving (serve, control, demo), review (shadow-log, report) and the lab's
suites.
"""

from __future__ import annotations

# isort: off
# Importing a module registers its commands; this order is the order of `cutover --help`.
from controller.cli import (
    rollout_verbs,
    state_views,
    operations,
    serving,
    review,
    lab,
    models,
    database,
)
from controller.cli.core import EXIT_ENVIRONMENT, EXIT_REFUSED, app

# isort: on

__all__ = ["EXIT_ENVIRONMENT", "EXIT_REFUSED", "app", "main"]
_COMMAND_MODULES = (rollout_verbs, state_views, operations, serving, review, lab, models, database)


def main() -> None:
    app()
