"""`userip run`: the main job, every stage in one run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from userip.cli.common import _friendly, app, console


@app.command("run")
@_friendly
def run_cmd(
    config: Path | None = typer.Option(None, "--config", help="Run config (default configs/ml-100k.yaml)."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<config name>)."),
    quick: bool = typer.Option(False, "--quick", help="A small slice for a first look in a few minutes."),
    seed: int | None = typer.Option(None, "--seed", help="Fixes every RNG of every stage."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh: remove what an earlier run wrote in --out (never other files)."
    ),
) -> None:
    """The main job: data -> profiles -> bank -> explain -> baselines -> CTR -> probe -> report.

    Rerunning into the same --out continues it: finished stages whose config did not change are skipped."""
    from rich.markdown import Markdown

    from userip.report import headline
    from userip.run import run

    record = run(config, out, quick=quick, seed=seed, overwrite=overwrite)
    run_dir = Path(out) if out is not None else Path("runs") / record["name"]
    console.rule("summary")
    console.print(Markdown("\n".join(f"- {line}" for line in headline(run_dir))))
    for name, st in record["stages"].items():
        console.print(f"  {name:<10} {st['wall_s']:>8.1f} s  {st['peak_rss_mb']:>7.0f} MB")
    console.print(f"report: {run_dir / 'report.md'} and {run_dir / 'report.html'}")
