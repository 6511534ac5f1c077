"""`userip export`: a run's CTR rows and profile IDs for other toolkits."""

from __future__ import annotations

from pathlib import Path

import typer

from userip.cli.common import OVERWRITE_HELP, _friendly, console, export_app


@export_app.command("fuxictr")
@_friendly
def export_fuxictr_cmd(
    run: Path = typer.Option(..., "--run", help="A `userip run` directory (reads RUN/data and RUN/bank.sqlite)."),
    out: Path = typer.Option(..., "--out", help="Output dir: train/valid/test.csv, dataset_config.yaml, "
                             "model_config.yaml, export.json."),
    bank: str | None = typer.Option(None, "--bank", help="Feature bank (path or URL; default RUN/bank.sqlite)."),
    history_len: int | None = typer.Option(
        None, "--history-len", help="Length of the history field (default: the run's CTR stage's)."
    ),
    models: str = typer.Option("DeepFM,DCN", "--models", help="FuxiCTR models to configure (comma list)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Write the run's CTR split with one column per profile ID as FuxiCTR CSVs and configs (each model with
    and without the profile fields)."""
    from userip.export import export_fuxictr

    info = export_fuxictr(run, out, bank=bank, history_len=history_len, overwrite=overwrite,
                          models=[m.strip() for m in models.split(",") if m.strip()])
    rows = ", ".join(f"{f} {n}" for f, n in info["rows"].items())
    console.print(f"wrote {out}: {rows}; profile columns {', '.join(p['column'] for p in info['profiles'])}")
    console.print(f"experiments: {', '.join(info['experiment_ids'])} (FuxiCTR: --config {out} --expid ID)")
