"""`userip ctr`: train CTR backbones on bank features."""

from __future__ import annotations

from pathlib import Path

import typer

from userip.cli.common import OVERWRITE_HELP, _friendly, console, ctr_app


@ctr_app.command("train")
@_friendly
def ctr_train(
    data: Path = typer.Option(..., "--data", help="Prepared data directory."),
    bank: str = typer.Option(..., "--bank", help="Feature bank (path or URL)."),
    profiles: Path | None = typer.Option(None, "--profiles", help="Profile run dir: adds the +theta variant."),
    baseline: list[Path] = typer.Option(
        [], "--baseline", help="A saved baseline dir (e.g. RUN/baselines/history): adds its sources (+hist-ids, "
        "+hist-dense, +text-ids, ...). Repeatable."
    ),
    backbones: str | None = typer.Option(None, "--backbones", help="Comma list (default: all five)."),
    seeds: int | None = typer.Option(None, "--seeds", help="Number of seeds (0..N-1), paired across variants."),
    out: Path = typer.Option(..., "--out", help="Output dir: results.json, results.md, predictions.npz, models/."),
    variants: str = typer.Option(
        "default", "--variants", help="default (the headline: base, +ids, +ids-permuted, +activity, +label-rate, "
        "+ids+label-rate, the strongest competitor and its twin), all (every source with its permuted twin), "
        "or a comma list such as base,+ids,+ids-permuted,+theta,+theta-permuted."
    ),
    competitor: str | None = typer.Option(
        None, "--competitor", help="The baseline in the default table (default: +hist-dense when built)."
    ),
    settings: str | None = typer.Option(None, "--settings", help="with_user_id, no_user_id or both (default)."),
    max_epochs: int | None = typer.Option(None, "--max-epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr"),
    bootstrap: int | None = typer.Option(None, "--bootstrap", help="Paired bootstrap replicates (users, seeds)."),
    threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads (default: torch's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Train CTR backbones with the profile IDs, their permuted twins and the controls; print the table.

    Options left out take the CTR stage's defaults (docs/config.md, section `ctr:`)."""
    from userip.ctr import train_ctr

    if threads:
        import torch

        torch.set_num_threads(threads)
    given = {"backbones": backbones, "seeds": seeds, "settings": settings, "max_epochs": max_epochs,
             "batch_size": batch_size, "lr": lr, "bootstrap": bootstrap}
    train_ctr(data, bank, profiles, out=out, variants=variants, overwrite=overwrite, baselines=baseline,
              competitor=competitor, **{k: v for k, v in given.items() if v is not None})
    console.print((out / "results.md").read_text(), markup=False, highlight=False, soft_wrap=True)
