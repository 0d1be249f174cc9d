"""Model commands: build a tiny pipeline offline, and measure the incumbent's A/A noise floor."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli.core import app, cli_config, guarded, models_app, out


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
) -> None:
    """Build a tiny random-weight Stable Diffusion pipeline offline (loaded back with from_pretrained)."""
    from workers.tiny import make_tiny_pipeline, variant_seed

    if seed is None and weights_of is not None:
        seed = variant_seed(weights_of)
    path = make_tiny_pipeline(directory, seed=seed, variant=variant)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    out.print(f"tiny pipeline {variant!r} saved to {path} ({size / 1e6:.1f} MB)")


@app.command(rich_help_panel="Models")
def calibrate(
    ctx: typer.Context,
    repeats: Annotated[int, typer.Option(help="Rounds over the prompt set.")] = 1,
    prompts: Annotated[str | None, typer.Option(help="A file with one prompt per line.")] = None,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
) -> None:
    """A/A: the incumbent against itself (other seeds); prints each metric's noise floor and a tolerance."""
    from rich.table import Table

    from controller.lab.calibrate import calibrate as run_calibration
    from controller.lab.calibrate import default_prompts
    from policies.policy import load_policy

    def run() -> None:
        config = cli_config(ctx, check_paths=True)
        policy = load_policy(config.policy_path)
        texts = (
            [line.strip() for line in open(prompts, encoding="utf-8") if line.strip()]
            if prompts
            else default_prompts()
        )
        floors = run_calibration(config, texts, repeats, policy, size)
        table = Table(
            title=f"A/A noise floor of {config.models.incumbent.pipeline}", title_justify="left"
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
