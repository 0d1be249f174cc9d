"""The `cutover` command's frame: the Typer app, global options, and how errors become exit codes.

Exit codes: 0 done; 2 refused or invalid input (the message says why and what
to do); 1 the environment failed (database unreachable, and the like). Every
command runs its work through `guarded`, so a mistake the user can fix is a
message, never a traceback.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from sqlalchemy.exc import OperationalError

from controller.config import Config, ConfigError, find_config_path, load_config
from controller.rollout.transitions import RolloutNotFound
from controller.storage.store import Store, StoreError
from workers.logs import ENV_LEVEL, configure_logging, level_from_env

EXIT_REFUSED = 2
EXIT_ENVIRONMENT = 1

app = typer.Typer(
    help="Shadow traffic and staged cutover for image-generation models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db", rich_help_panel="Set-up")
models_app = typer.Typer(help="Model pipelines.", no_args_is_help=True)
app.add_typer(models_app, name="models", rich_help_panel="Models")

RolloutOpt = Annotated[
    str | None,
    typer.Option("--rollout", "-r", help="Which rollout (default: the only one in the config)."),
]

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Context:
    config_path: str | None
    actor: str


class Refused(Exception):
    """A refusal to show the user and exit 2 with."""


@app.callback()
def _main(
    ctx: typer.Context,
    config: Annotated[
        str | None,
        typer.Option(
            "-c", "--config", help="Config file (else $CUTOVER_CONFIG, else ./cutover.yaml)."
        ),
    ] = None,
    actor: Annotated[
        str | None, typer.Option(help="Who is acting, for the audit trail (default: OS user).")
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help=f"debug, info, warning or error (default: ${ENV_LEVEL}, else warning)."),
    ] = None,
) -> None:
    configure_logging(level=log_level or level_from_env("warning"))
    ctx.obj = Context(config_path=config, actor=actor or _os_user())


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def cli_config(ctx: typer.Context, check_paths: bool = False) -> Config:
    """The config named by -c, $CUTOVER_CONFIG or ./cutover.yaml. With an object store,
    images this node lacks are fetched from it by whatever the command reads."""
    from controller.storage.artifact_store import artifacts_for

    config = load_config(find_config_path(ctx.obj.config_path), check_paths=check_paths)
    if config.object_store is not None:
        artifacts_for(config)
    return config


@contextmanager
def open_store(config: Config) -> Iterator[Store]:
    store = Store.for_config(config)
    try:
        yield store
    finally:
        store.close()


def guarded(fn: Any) -> Any:
    """Turn the errors a user can fix into a message and an exit code, never a traceback."""
    try:
        return fn()
    except (ConfigError, RolloutNotFound, StoreError, Refused) as exc:
        err.print(
            f"[red]error:[/red] {exc}"
            if not isinstance(exc, Refused)
            else f"[red]refused:[/red] {exc}"
        )
        raise typer.Exit(EXIT_REFUSED) from None
    except OperationalError as exc:
        err.print(f"[red]error:[/red] cannot use the database: {exc.orig or exc}")
        raise typer.Exit(EXIT_ENVIRONMENT) from None
