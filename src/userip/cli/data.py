"""`userip data`: prepare and inspect datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from userip.cli.common import OVERWRITE_HELP, _friendly, console, data_app


@data_app.command("prepare")
@_friendly
def data_prepare(
    out: Path = typer.Option(..., "--out", help="Output directory: new, empty, or a DATA dir userip wrote."),
    dataset: str | None = typer.Option(None, "--dataset", help="Built-in dataset: ml-100k."),
    interactions: Path | None = typer.Option(None, "--interactions", help="CSV/Parquet interactions file."),
    items: Path | None = typer.Option(None, "--items", help="CSV/Parquet items file."),
    users: Path | None = typer.Option(None, "--users", help="CSV/Parquet users file (optional)."),
    config: Path | None = typer.Option(None, "--config", help="YAML config (column mapping, split)."),
    source: Path | None = typer.Option(None, "--source", help="Local directory holding ML-100K files."),
    name: str | None = typer.Option(
        None, "--name", help="What stats and reports call the dataset (default: ml-100k or the interactions "
        "file's name)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Load a dataset, split it per user in time order, write Parquet tables + stats.json.

    Your own log: --interactions/--items [--users] plus a --config whose `data:` section maps your columns
    (names, 0/1 label or rating, genre separator, split). Every key, its default and two worked examples (a
    binary-label CTR log with titles; a review log): docs/config.md."""
    from userip.data import format_stats, prepare

    data = prepare(
        out, dataset=dataset, interactions=interactions, items=items, users=users, config=config, source=source,
        overwrite=overwrite, name=name,
    )
    console.print(format_stats(data.stats))


@data_app.command("stats")
@_friendly
def data_stats(data_dir: Path = typer.Argument(..., help="A prepared data directory.")) -> None:
    """Print the counts of a prepared dataset."""
    from userip.data import format_stats, load_stats

    console.print(format_stats(load_stats(data_dir)))
