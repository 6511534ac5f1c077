"""The `userip` command line. Parses arguments, calls the stage functions (the public Python API), prints.

One module per command group (`data`, `profile`, `bank`, `ctr`, `explain`, `run`, `export`, `serve`); the typer
apps, consoles and error wrapper live in `common`. Stage modules are imported inside each command so
`userip --help` stays fast and a broken optional stage cannot break the others.
"""

from __future__ import annotations

# Importing a command module registers its commands on `app` (top-level commands list in this order).
from userip.cli import bank, ctr, data, explain, export, profile, run, serve  # noqa: F401
from userip.cli.common import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - entry point
    app()
