"""The lab phase's files: prompt suites (list, check, and drawing one from recorded traffic)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controller.cli.core import Refused, app, cli_config, err, guarded, open_store, out

suite_app = typer.Typer(help="Prompt suites for the lab phase.", no_args_is_help=True)
app.add_typer(suite_app, name="suite", rich_help_panel="Lab")


@suite_app.command("list")
def list_suites() -> None:
    """The suites cutover ships: name, version, items and their routes."""
    from controller.lab.suites import load_suite, shipped_suites

    for name, path in shipped_suites().items():
        suite = load_suite(path)
        routes = sorted({item.route.value for item in suite.items})
        out.print(f"{name:<16} v{suite.version}  {len(suite.items):>3} items  {', '.join(routes)}")


@suite_app.command("check")
def check(
    files: Annotated[list[str], typer.Argument(help="Suite files or shipped names.")],
) -> None:
    """Load each suite and report every problem with its file, line and key."""
    from controller.lab.suites import find_suite, load_suite
    from policies.yaml_source import SourceError

    failed = False
    for name in files:
        try:
            suite = load_suite(find_suite(name))
        except SourceError as exc:
            failed = True
            err.print("\n".join(f"[red]error:[/red] {p}" for p in exc.problems))
            continue
        out.print(f"{name}: {suite.suite} v{suite.version}, {len(suite.items)} items, ok")
    if failed:
        raise typer.Exit(2)


@suite_app.command("from-shadow-log")
def from_shadow_log(
    ctx: typer.Context,
    route: Annotated[str, typer.Option(help="The route whose recorded prompts to sample.")],
    out_path: Annotated[Path, typer.Option("--out", help="The suite file to write.")],
    n: Annotated[int, typer.Option("--n", min=1, help="How many prompts.")] = 200,
) -> None:
    """A representative suite from recorded prompts, spread over tags and time, without
    users' identifiers."""
    from controller.config import Route
    from controller.lab.representative import sample_from_log, suite_yaml

    def run() -> None:
        try:
            chosen = Route(route)
        except ValueError:
            raise Refused(
                f"--route {route!r}: use one of {', '.join(r.value for r in Route)}"
            ) from None
        if out_path.exists():
            raise Refused(f"{out_path} exists; suites are versioned, write a new file")
        config = cli_config(ctx)
        with open_store(config) as store:
            store.require_schema()
            with store.reader() as session:
                try:
                    suite = sample_from_log(session, chosen, n, _suite_name(out_path))
                except ValueError as exc:
                    raise Refused(str(exc)) from None
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(suite_yaml(suite), encoding="utf-8")
        out.print(f"wrote {out_path}: {len(suite.items)} items. {suite.description}")

    guarded(run)


def _suite_name(path: Path) -> str:
    """The file's stem as a suite name (lower case, dashes)."""
    import re

    name = re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")
    return name or "representative"
