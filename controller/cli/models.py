"""Model commands: build a tiny pipeline offline, and measure the incumbent's A/A noise floor."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli.core import RolloutOpt, app, cli_config, guarded, models_app, out
from workers.config import ModelKind


@models_app.command("make-tiny")
def make_tiny(
    directory: Annotated[str, typer.Argument(help="Where to save the pipeline.")],
    seed: Annotated[
        int | None, typer.Option(help="Weight seed (default: derived from --variant).")
    ] = None,
    variant: Annotated[
        str, typer.Option(help="A name; different names give different weights.")
    ] = "incumbent",
    weights_of: Annotated[
        str | None,
        typer.Option(
            help="Use another variant's weights (for example `incumbent`): a candidate that "
            "should pass its rollout."
        ),
    ] = None,
    kind: Annotated[
        ModelKind, typer.Option(help="What the model does: the diffusers pipeline it is.")
    ] = ModelKind.TEXT2IMG,
    distilled: Annotated[
        bool,
        typer.Option(
            help="A few-step model (LCM scheduler) for thumbnail and fallback routes: serve it "
            "with sampler: lcm and steps: 1-4."
        ),
    ] = False,
) -> None:
    """Build a tiny random-weight diffusers pipeline offline (loaded back with from_pretrained)."""
    from workers.tiny import make_tiny_pipeline, variant_seed

    if seed is None and weights_of is not None:
        seed = variant_seed(weights_of)
    path = make_tiny_pipeline(
        directory, seed=seed, variant=variant, kind=kind.value, distilled=distilled
    )
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    what = f"{kind.value}{' distilled' if distilled else ''}"
    out.print(f"tiny {what} pipeline {variant!r} saved to {path} ({size / 1e6:.1f} MB)")


@app.command(rich_help_panel="Models")
def calibrate(
    ctx: typer.Context,
    repeats: Annotated[int, typer.Option(help="Rounds over the prompt set.")] = 1,
    prompts: Annotated[str | None, typer.Option(help="A file with one prompt per line.")] = None,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    rollout: RolloutOpt = None,
) -> None:
    """A/A: the incumbent against itself (other seeds); prints each metric's noise floor and a tolerance."""
    from rich.table import Table

    from controller.lab.calibrate import calibrate as run_calibration
    from controller.lab.calibrate import default_prompts
    from policies.policy import load_policy

    def run() -> None:
        config = cli_config(ctx, check_paths=True)
        plan = config.plan(rollout)
        policy = load_policy(plan.policy_path)
        texts = (
            [line.strip() for line in open(prompts, encoding="utf-8") if line.strip()]
            if prompts
            else default_prompts()
        )
        floors = run_calibration(config, texts, repeats, policy, size, model=plan.incumbent)
        table = Table(
            title=f"A/A noise floor of {plan.incumbent} ({config.models[plan.incumbent].pipeline})",
            title_justify="left",
        )
        for column in ("metric", "pairs", "mean", "p95", "suggested tolerance", "how"):
            table.add_column(column)
        for f in floors:
            table.add_row(
                f.metric,
                str(f.pairs),
                f"{f.mean:.4g}",
                f"{f.p95:.4g}",
                f"{f.suggested:.4g}",
                f.note,
            )
        out.print(table)

    guarded(run)
