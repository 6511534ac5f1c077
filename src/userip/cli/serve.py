"""`userip serve`: CTR scores over HTTP."""

from __future__ import annotations

from pathlib import Path

import typer

from userip.cli.common import _friendly, app


@app.command("serve")
@_friendly
def serve_cmd(
    bank: str = typer.Option(..., "--bank", help="Feature bank (path or URL) the model reads profile IDs from."),
    ctr: Path = typer.Option(..., "--ctr", help="CTR dir (`userip ctr train --out`): results.json, models/."),
    data: Path | None = typer.Option(None, "--data", help="Prepared data dir (default: the one in results.json)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    backbone: str | None = typer.Option(
        None, "--backbone", help="Model under CTR/models (default: the first trained with +ids)."
    ),
    explanations: Path | None = typer.Option(
        None, "--explanations", help="explanations.json (default: looked up next to the bank / run dir)."
    ),
    max_batch: int = typer.Option(1000, "--max-batch", min=1, help="Most item ids per score request."),
    history: str = typer.Option("all", "--history", help="User history for DIN/history fields: all or train."),
    access_log: bool = typer.Option(False, "--access-log/--no-access-log", help="Log every request."),
) -> None:
    """Serve CTR scores over HTTP from the trained model and the bank (no LLM call)."""
    from userip.serve import serve

    serve(bank, ctr, data, backbone, host=host, port=port, max_batch=max_batch, explanations=explanations,
          history=history, access_log=access_log)
