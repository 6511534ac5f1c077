"""The `userip` command line. Parses arguments, calls the stage functions (the public Python API), prints.

Stage modules are imported inside each command so `userip --help` stays fast and a broken optional stage
cannot break the others.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from userip.errors import UseripError

app = typer.Typer(help="UserIP-Tuning: LLM-inferred user-profile IDs for CTR models.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare and inspect datasets.", no_args_is_help=True)
profile_app = typer.Typer(help="Fit soft user profiles (EM) and their collaborative IDs.", no_args_is_help=True)
bank_app = typer.Typer(help="Feature bank: user -> profile IDs.", no_args_is_help=True)
ctr_app = typer.Typer(help="CTR models on bank features.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(profile_app, name="profile")
app.add_typer(bank_app, name="bank")
app.add_typer(ctr_app, name="ctr")

console = Console()
err_console = Console(stderr=True)


def _friendly(fn):
    """Turn input errors into one readable line and exit code 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UseripError as e:
            err_console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    return wrapper


# ---------------------------------------------------------------- data
@data_app.command("prepare")
@_friendly
def data_prepare(
    out: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Built-in dataset: ml-100k."),
    interactions: Optional[Path] = typer.Option(None, "--interactions", help="CSV/Parquet interactions file."),
    items: Optional[Path] = typer.Option(None, "--items", help="CSV/Parquet items file."),
    users: Optional[Path] = typer.Option(None, "--users", help="CSV/Parquet users file (optional)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (column mapping, split)."),
    source: Optional[Path] = typer.Option(None, "--source", help="Local directory holding ML-100K files."),
) -> None:
    """Load a dataset, split it per user in time order, write Parquet tables + stats.json."""
    from userip.data import format_stats, prepare

    data = prepare(
        out, dataset=dataset, interactions=interactions, items=items, users=users, config=config, source=source
    )
    console.print(format_stats(data.stats))


@data_app.command("stats")
@_friendly
def data_stats(data_dir: Path = typer.Argument(..., help="A prepared data directory.")) -> None:
    """Print the counts of a prepared dataset."""
    from userip.data import format_stats, load_stats

    console.print(format_stats(load_stats(data_dir)))


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
