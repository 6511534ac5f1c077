"""The CTR table's result files: ``results.json`` (runs, fits, paired lifts) and ``results.md`` (the headline)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from userip.ctr.table import results_markdown, summary_sentences, winners


def write_results(out: Path, rows: list[dict], fits: list[dict], info: dict, final: pd.DataFrame | None = None,
                  lifts: pd.DataFrame | None = None) -> None:
    """``results.json`` with the runs so far (rewritten after every backbone); with ``final`` and ``lifts``
    (the whole table) the paired comparisons too, and ``results.md``."""
    from userip.io import atomic_path, write_json

    body = {"meta": info, "runs": json_safe(rows), "fits": json_safe(fits)}
    if lifts is not None:
        body["lifts"] = json_safe(lifts.to_dict(orient="records"))
        body["summary"] = summary_sentences(lifts)
        body["winners"] = winners(lifts)
        body["comparisons"] = len(lifts)
    write_json(out / "results.json", body)
    if final is not None:
        notes = [
            f"Cold slice: users with <= {info['cold_threshold']:g} train interactions "
            f"({info['cold_test_rows']} test rows). `+activity` uses {info['activity_buckets']} buckets, "
            f"`+label-rate` {info['label_rate_buckets']} ({info['label_rate_of']})."
        ]
        max_epochs = info["train"]["max_epochs"]
        hit = sum(f["epochs"] >= max_epochs for f in fits)
        if hit:
            notes.append(
                f"{hit} of {len(fits)} runs stopped at max_epochs={max_epochs} without early stopping: "
                "they may be under-trained (raise --max-epochs or --lr)."
            )
        walls = [f["wall_s"] for f in fits]
        notes.append(f"{len(fits)} fits, {np.median(walls):.1f} s median per fit (train, validate, predict).")
        with atomic_path(out / "results.md") as tmp:
            tmp.write_text(results_markdown(final, lifts, notes=notes, reads=info.get("reads"),
                                            n_boot=info["bootstrap"]["replicates"]))


def json_safe(obj):
    """``obj`` with numpy scalars as Python numbers and NaN as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and math.isnan(obj):
        return None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
