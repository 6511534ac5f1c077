"""What every `userip` command module shares: the typer apps, the consoles and the error wrapper."""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

from userip.errors import UseripError

app = typer.Typer(help="UserIP-Tuning: LLM-inferred user-profile IDs for CTR models.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare and inspect datasets.", no_args_is_help=True)
profile_app = typer.Typer(help="Fit soft user profiles (EM) and their collaborative IDs.", no_args_is_help=True)
bank_app = typer.Typer(help="Feature bank: user -> profile IDs.", no_args_is_help=True)
ctr_app = typer.Typer(help="CTR models on bank features.", no_args_is_help=True)
export_app = typer.Typer(help="Export a run's CTR rows and profile IDs to other toolkits.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(profile_app, name="profile")
app.add_typer(bank_app, name="bank")
app.add_typer(ctr_app, name="ctr")
app.add_typer(export_app, name="export")

console = Console()
OVERWRITE_HELP = "Replace a finished output of this command in --out (only the files userip wrote there)."
err_console = Console(stderr=True, soft_wrap=True)  # never break a path in an error message


def _friendly(fn):
    """Turn input errors into one readable line and exit code 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UseripError as e:
            err_console.print("[bold red]error:[/]", escape(str(e)))
            raise typer.Exit(2) from None

    return wrapper
