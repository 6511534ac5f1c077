"""stats.json of a DATA dir: computed at `prepare`, read without the tables, and summarised for people."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from userip.data.config import DataConfig
from userip.data.split import SPLITS
from userip.errors import InputError
from userip.io import read_json


def compute_stats(
    inter: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    genre_vocab: list[str],
    cfg: DataConfig,
    *,
    name: str,
    source: str,
    fingerprint: str,
) -> dict[str, Any]:
    labels = inter["label"].to_numpy()
    splits = {}
    for s in SPLITS:
        m = (inter["split"] == s).to_numpy()
        splits[s] = {
            "interactions": int(m.sum()),
            "users": int(inter.loc[m, "user_idx"].nunique()),
            "items": int(inter.loc[m, "item_idx"].nunique()),
            "label_rate": round(float(labels[m].mean()), 6) if m.any() else None,
        }
    return {
        "dataset": name,
        "source": source,
        "fingerprint": fingerprint,
        "n_interactions": int(len(inter)),
        "n_users": int(len(users)),
        "n_items": int(len(items)),
        "n_genres": len(genre_vocab),
        "n_users_with_interactions": int(inter["user_idx"].nunique()),
        "n_items_with_interactions": int(inter["item_idx"].nunique()),
        "n_users_single_interaction": int((inter.groupby("user_idx").size() == 1).sum()),
        "n_users_without_train": int(inter["user_idx"].nunique())
        - int(inter.loc[(inter["split"] == "train").to_numpy(), "user_idx"].nunique()),
        "label_rate": round(float(labels.mean()), 6) if len(labels) else None,
        "rating_mean": None if inter["rating"].isna().all() else round(float(inter["rating"].mean()), 6),
        "timestamp_range": [int(inter["timestamp"].min()), int(inter["timestamp"].max())],
        "split_mode": cfg.split.mode,
        "splits": splits,
        "user_features": [c for c in users.columns if c not in ("user_idx", "user_id")],
        "has_text": "text" in inter.columns or "text" in items.columns,
        # which text was loaded: `behaviour: review` needs interactions.text (the review of each interaction)
        "text_columns": [t for t, frame in (("interactions.text", inter), ("items.text", items))
                         if "text" in frame.columns],
    }


def load_stats(path: str | os.PathLike) -> dict[str, Any]:
    """stats.json of a DATA dir (or the file itself), without loading the tables."""
    path = Path(path)
    f = path / "stats.json" if path.is_dir() else path
    if not f.is_file():
        raise InputError(
            path, "no stats.json here: not a prepared data directory (run `userip data prepare`)"
        )
    try:
        return read_json(f)
    except ValueError as e:
        raise InputError(f, f"not valid JSON: {e}") from None


def format_stats(stats: dict[str, Any]) -> str:
    """Readable summary. Plain integers (100000, not 100,000) so the numbers can be grepped."""

    def rate(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    sp = stats.get("splits", {})
    lines = [
        f"dataset {stats.get('dataset')}",
        f"source  {stats.get('source')}",
        f"interactions {stats.get('n_interactions')} | users {stats.get('n_users')} | "
        f"items {stats.get('n_items')} | genres {stats.get('n_genres')}",
        f"split ({stats.get('split_mode')}): "
        + " | ".join(f"{s} {sp.get(s, {}).get('interactions')}" for s in SPLITS),
        "users per split: " + " | ".join(f"{s} {sp.get(s, {}).get('users')}" for s in SPLITS)
        + (f" | without train {stats['n_users_without_train']} "
           f"({stats.get('n_users_single_interaction')} with a single interaction)"
           if stats.get("n_users_without_train") else ""),
        f"label rate ({stats.get('label_rule', 'label')}): all {rate(stats.get('label_rate'))} | "
        + " | ".join(f"{s} {rate(sp.get(s, {}).get('label_rate'))}" for s in SPLITS),
        "text    " + _text_line(stats),
        f"fingerprint {str(stats.get('fingerprint'))[:16]}",
    ]
    return "\n".join(lines)


def _text_line(stats: dict[str, Any]) -> str:
    cols = stats.get("text_columns")
    if cols is None:  # stats written before text_columns existed
        return "loaded" if stats.get("has_text") else "none loaded"
    if not cols:
        return ("none loaded (behaviour: review needs columns.interactions.text; titles are always used)")
    return "loaded: " + ", ".join(cols)
