"""The lab phase: prompt suites (list, check, drawn from recorded traffic), the bake-off of
several models, and the validation that lets a rollout start."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from controller.cli.core import (
    EXIT_REFUSED,
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
from controller.storage.store import Store
from policies.policy import Policy

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


@app.command(rich_help_panel="Lab")
def bakeoff(
    ctx: typer.Context,
    suite: Annotated[
        list[str], typer.Option("--suite", help="Suite names or files (repeat, or A,B).")
    ],
    models: Annotated[str, typer.Option("--models", help="Models of the pool to compare: A,B,C.")],
    baseline: Annotated[
        str | None,
        typer.Option(help="The model the others are compared with (default: generate's model)."),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per suite item.")] = 2,
    round_size: Annotated[int, typer.Option(min=1, help="Units judged between looks.")] = 32,
    early_stop: Annotated[
        bool, typer.Option(help="Stop rendering a model a critical check shows worse.")
    ] = True,
    report: Annotated[Path | None, typer.Option(help="Write the HTML report here.")] = None,
    price: Annotated[
        float | None,
        typer.Option("--price-per-device-hour", help="Show cost per 1,000 images at this price."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="The result as JSON, for scripts.")
    ] = False,
) -> None:
    """Render suites on several models at once and rank them against a baseline, with
    intervals adjusted for the number of models. Resumable: a rerun renders only what is missing."""
    import json

    from controller.lab.runs import bakeoff_judging, plan_run, run_on_ray
    from policies.policy import load_policy

    def run() -> None:
        config = cli_config(ctx, check_paths=True)
        names = [m.strip() for m in models.split(",") if m.strip()]
        base = baseline or _default_baseline(config)
        suites = [s.strip() for entry in suite for s in entry.split(",") if s.strip()]
        try:
            plan = plan_run(config, suites, names, base, seeds)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        policy = load_policy(config.policy_path())
        with open_store(config) as store:
            store.upgrade()
            result = run_on_ray(
                config,
                store,
                plan,
                bakeoff_judging(policy, len(names)),
                round_size=round_size,
                early_stop=early_stop,
            )
            if report is not None:
                _write_report(store, config, result, report, policy)
        if as_json:
            out.print_json(json.dumps(result))
        else:
            print_ranking(result, price)
            if report is not None:
                out.print(f"report: {report.resolve()}")

    guarded(run)


def _default_baseline(config: Config) -> str:
    from controller.config import Route

    route = config.route_map.get(Route.GENERATE)
    if route is None:
        raise Refused("no generate route to take a baseline from: pass --baseline MODEL")
    return route.model


def _write_report(
    store: Store, config: Config, result: dict[str, Any], path: Path, policy: Policy
) -> None:
    from controller.review.bakeoff_report import build_bakeoff_report

    with store.reader() as session:
        html = build_bakeoff_report(session, config, result["run"], policy)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")


def print_ranking(result: dict[str, Any], price: float | None = None) -> None:
    """The ranking as a table, then each model's lines."""
    from rich.table import Table

    alpha = result["alpha"]
    table = Table(
        title=f"{result['kind']} against {result['baseline']}: {result['units']} units, "
        f"intervals {(1 - alpha) * 100:.4g}% over the whole comparison",
        title_justify="left",
    )
    for column in ("rank", "model", "vs baseline", "pairs", "latency p50 ms", "device-s/image"):
        table.add_column(column)
    base = result["baseline_latency_ms_p50"]
    table.add_row("-", result["baseline"], "baseline", "-", _figure(base), "-")
    for rank_, s in enumerate(result["ranking"], 1):
        cost = s["device_seconds_per_image_p50"]
        cost_text = _figure(cost, "{:.3g}")
        if price is not None and cost["estimate"] is not None:
            cost_text += f" (${cost['estimate'] * price / 3.6:.3g}/1k)"
        table.add_row(
            str(rank_),
            s["model"],
            s["verdict"],
            str(s["units"]),
            _figure(s["latency_ms_p50"]),
            cost_text,
            style={"worse": "red", "better": "green"}.get(s["verdict"]),
        )
    out.print(table)
    for s in result["ranking"]:
        for line in s["lines"]:
            out.print(f"  {s['model']}: {line}", soft_wrap=True)
    if result.get("images_per_second"):
        out.print(
            f"rendered {result['rendered_now']} images now, "
            f"{result['images_per_second']:.2f} images/s across the models"
        )


def _figure(figure: dict[str, float | None], fmt: str = "{:.0f}") -> str:
    if figure["estimate"] is None:
        return "n/a"
    lower = "-inf" if figure["lower"] is None else fmt.format(figure["lower"])
    upper = "inf" if figure["upper"] is None else fmt.format(figure["upper"])
    return f"{fmt.format(figure['estimate'])} [{lower}, {upper}]"


@app.command(rich_help_panel="Lab")
def validate(
    ctx: typer.Context,
    rollout: RolloutOpt = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per suite item.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="The outcome as JSON.")] = False,
) -> None:
    """Run the rollout's candidate against its route's model on the route's suites, with the
    rollout's policy. A PASS is what `init` and `retry` ask for."""
    import json

    from controller.lab.validation import validate as run_validation

    def run() -> None:
        config = cli_config(ctx, check_paths=True)
        plan = config.plan(rollout)
        with open_store(config) as store:
            store.upgrade()
            try:
                row, result = run_validation(config, store, plan, ctx.obj.actor, seeds)
            except ValueError as exc:
                raise Refused(str(exc)) from None
        if as_json:
            out.print_json(json.dumps({"decision": row.decision, "reason": row.reason, **result}))
        else:
            print_ranking(result)
            colour = {"PASS": "green", "FAIL": "red"}.get(row.decision, "yellow")
            suites = ", ".join(f"{k} v{v}" for k, v in row.suites.items())
            out.print(
                f"validation of {plan.name} on {suites}: [{colour}]{row.decision}[/{colour}] "
                f"({row.reason})",
                soft_wrap=True,
            )
        if row.decision != "PASS":
            raise typer.Exit(EXIT_REFUSED)

    guarded(run)
