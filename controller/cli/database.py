"""`cutover db`: move the schema up or down by Alembic revision."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli.core import cli_config, db_app, guarded, open_store, out


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""

    def run() -> None:
        config = cli_config(ctx)
        with open_store(config) as store:
            store.upgrade(revision)
            out.print(f"database at {store.safe_url} is at revision {store.current_revision()}")

    guarded(run)


@db_app.command("downgrade")
def db_downgrade(
    ctx: typer.Context, revision: Annotated[str, typer.Argument(help="Target, e.g. base.")]
) -> None:
    """Undo migrations down to REVISION (`base` removes every cutover table and its data)."""

    def run() -> None:
        config = cli_config(ctx)
        with open_store(config) as store:
            store.downgrade(revision)
            out.print(
                f"database at {store.safe_url} is at revision {store.current_revision() or 'base'}"
            )

    guarded(run)
