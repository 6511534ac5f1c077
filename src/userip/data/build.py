"""`prepare`: raw logs -> a DATA dir. Load, validate across tables, re-index ids densely, label, split, write.

All input checks run before anything is written; the DATA dir is written atomically (`datadir.write_prepared`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.data.config import ConfigError, DataConfig
from userip.data.datadir import PathLike, write_prepared
from userip.data.fingerprint import FINGERPRINT_VERSION, fingerprint_data
from userip.data.prepared import PreparedData
from userip.data.readers import RawTables, check_tables, read_generic
from userip.data.split import assign_split
from userip.data.stats import compute_stats
from userip.errors import UseripError
from userip.io import check_output_dir

log = logging.getLogger(__name__)


def prepare(
    out: PathLike,
    *,
    dataset: str | None = None,
    interactions: PathLike | None = None,
    items: PathLike | None = None,
    users: PathLike | None = None,
    config: DataConfig | PathLike | dict | None = None,
    source: PathLike | None = None,
    max_users: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    name: str | None = None,
) -> PreparedData:
    """Load a dataset, re-index ids, label, split, and write the DATA dir ``out`` atomically.

    ``name`` (CLI ``--name``) is what stats and reports call the dataset; default: the built-in dataset's
    name, or the interactions file's stem (so most own logs would all be called "interactions").

    ``out`` must be new, empty or a DATA dir userip wrote; a finished one is replaced only with
    ``overwrite=True``, and files userip did not write are never removed.

    ``max_users`` keeps a seeded random subset of users (and their interactions): a small slice for a quick
    first look (`userip run --quick`) that every later stage sees consistently.

    Either ``dataset="ml-100k"`` (fetched and cached; ``source`` = a local copy to use instead) or your own
    ``interactions`` + ``items`` (+ ``users``) files with the column mapping of ``config``. All input checks
    run before anything is written.
    """
    check_output_dir(out, "data", overwrite=overwrite)  # refuse a user's folder before any work
    if name is not None and (not isinstance(name, str) or not name.strip() or "\n" in name):
        raise UseripError(f"--name: expected a non-empty one-line dataset name, got {name!r}")
    cfg = resolve_config(config, dataset)
    interactions = interactions if interactions is not None else cfg.interactions
    items = items if items is not None else cfg.items
    users = users if users is not None else cfg.users

    if cfg.dataset is not None:
        if interactions is not None or items is not None or users is not None:
            raise UseripError(
                f"give either a built-in dataset ({cfg.dataset}) or your own --interactions/--items files, "
                "not both"
            )
        from userip.data.ml100k import load_ml100k

        raw = load_ml100k(source, verify=cfg.verify_checksums)
        default_name_for = cfg.dataset
    else:
        if source is not None:
            raise UseripError("--source is only used with --dataset ml-100k")
        if interactions is None or items is None:
            raise UseripError(
                "nothing to prepare: give --dataset ml-100k, or --interactions and --items files "
                "(plus --config for the column mapping)"
            )
        raw = read_generic(interactions, items, users, cfg)
        default_name_for = Path(interactions).stem

    default_name = name is None
    name = name.strip() if name is not None else default_name_for
    if max_users:
        raw = subset_users(raw, int(max_users), seed)
        if default_name:  # a name the user chose is kept as given; the subset is recorded in the stats
            name = f"{name}-{int(max_users)}users-seed{seed}"
    data = build(raw, cfg, name)
    if max_users:
        data.stats["subset"] = {"max_users": int(max_users), "seed": int(seed)}
    write_prepared(data, out, overwrite=overwrite)
    data.path = Path(out)
    return data


def subset_users(raw: RawTables, n: int, seed: int) -> RawTables:
    """Keep ``n`` users drawn with ``seed`` (all of them when there are fewer)."""
    users = np.array(sorted(raw.interactions["user_id"].unique()))
    if n >= len(users):
        return raw
    keep = set(np.random.default_rng(seed).choice(users, size=n, replace=False).tolist())
    inter = raw.interactions[raw.interactions["user_id"].isin(keep)].reset_index(drop=True)
    items = raw.items
    user_table = None if raw.users is None else raw.users[raw.users["user_id"].isin(keep)].reset_index(drop=True)
    return dataclasses.replace(raw, interactions=inter, items=items, users=user_table)


def resolve_config(config: DataConfig | PathLike | dict | None, dataset: str | None) -> DataConfig:
    """Config from an object, a dict or a YAML path, on top of the preset of ``dataset`` when given."""
    if isinstance(config, DataConfig):
        cfg = DataConfig.from_dict(config.to_dict(), base=DataConfig())  # a copy, revalidated
        if dataset is not None:
            cfg.dataset = dataset
            cfg.validate()
        return cfg
    base = DataConfig.preset(dataset) if dataset is not None else None
    if config is None:
        return base if base is not None else DataConfig()
    if isinstance(config, dict):
        cfg = DataConfig.from_dict(config, base=base)
    else:
        cfg = DataConfig.from_yaml(config, base=base)
    if dataset is not None and cfg.dataset != dataset:
        cfg.dataset = dataset
        cfg.validate()
    return cfg


def build(raw: RawTables, cfg: DataConfig, name: str) -> PreparedData:
    """Validate across tables, re-index ids densely, derive labels and the split; nothing is written here."""
    check_tables(raw)
    inter = raw.interactions

    user_order = sorted_ids(raw.users["user_id"] if raw.users is not None else inter["user_id"])
    item_order = sorted_ids(raw.items["item_id"])
    user_map = {u: i for i, u in enumerate(user_order, start=1)}
    item_map = {t: i for i, t in enumerate(item_order, start=1)}

    # ---- users
    if raw.users is not None:
        users = raw.users.copy()
        users["user_idx"] = users["user_id"].map(user_map).astype("int64")
    else:
        users = pd.DataFrame({"user_id": user_order, "user_idx": np.arange(1, len(user_order) + 1)})
    feat_cols = [c for c in users.columns if c not in ("user_id", "user_idx", "_row")]
    users = users[["user_idx", "user_id", *feat_cols]].sort_values("user_idx").reset_index(drop=True)
    for c in feat_cols:  # whole-number numeric features (ages) as nullable ints, not 24.0
        if pd.api.types.is_float_dtype(users[c]):
            v = users[c].to_numpy(dtype="float64")
            if np.all(np.isnan(v) | (v == np.round(v))):
                users[c] = pd.array([None if np.isnan(x) else int(x) for x in v], dtype="Int64")
    _check_side_features(cfg, feat_cols, raw.files.get("users"))

    # ---- items
    items = raw.items.copy()
    items["item_idx"] = items["item_id"].map(item_map).astype("int64")
    genre_vocab = sorted({g for gs in items["genres"] for g in gs})
    item_cols = ["item_idx", "item_id", "title", "genres", "year"] + (
        ["text"] if "text" in items.columns else []
    )
    items = items[item_cols].sort_values("item_idx").reset_index(drop=True)
    items["year"] = pd.array(
        [None if np.isnan(y) else int(y) for y in items["year"].to_numpy(dtype="float64")], dtype="Int64"
    )

    # ---- interactions
    df = pd.DataFrame(
        {
            "user_idx": inter["user_id"].map(user_map).astype("int64").to_numpy(),
            "item_idx": inter["item_id"].map(item_map).astype("int64").to_numpy(),
            "rating": inter["rating"].to_numpy(dtype="float32"),
            "timestamp": inter["timestamp"].to_numpy(dtype="int64"),
            "_row": inter["_row"].to_numpy(),
        }
    )
    if cfg.columns.interactions.label is not None:
        df["label"] = inter["label"].to_numpy().astype("int8")
        label_rule = f"given column '{cfg.columns.interactions.label}'"
    else:
        df["label"] = (df["rating"].to_numpy() >= np.float32(cfg.label_threshold)).astype("int8")
        label_rule = f"rating >= {cfg.label_threshold:g}"
    if "text" in inter.columns:
        df["text"] = inter["text"].to_numpy()
    df["split"] = assign_split(df, cfg.split)
    df = df.sort_values(["user_idx", "timestamp", "_row"], kind="stable").reset_index(drop=True)
    cols = ["user_idx", "item_idx", "rating", "label", "timestamp", "split"] + (
        ["text"] if "text" in df.columns else []
    )
    df = df[cols]

    id_maps = {"user": user_map, "item": item_map, "genre": genre_vocab}
    fp = fingerprint_data(user_map, item_map, df)
    stats = compute_stats(df, users, items, genre_vocab, cfg, name=name, source=raw.source, fingerprint=fp)
    stats["fingerprint_version"] = FINGERPRINT_VERSION
    stats["label_rule"] = label_rule
    if stats["n_users_without_train"]:
        log.warning(
            "%s: %d of %d users have no train interactions (%d with a single interaction): the split puts all "
            "their history in val/test, so they get no profile and count as cold users",
            raw.files.get("interactions", name), stats["n_users_without_train"],
            stats["n_users_with_interactions"], stats["n_users_single_interaction"],
        )  # fmt: skip
    return PreparedData(df, items, users, stats, cfg, id_maps)


def _check_side_features(cfg: DataConfig, feat_cols: list[str], users_file: str | None) -> None:
    if cfg.side_features is not None:
        missing = [f for f in cfg.side_features if f not in feat_cols]
        if missing:
            where = f"users file {users_file}" if users_file else "no users file was given"
            raise ConfigError(
                f"side_features: {', '.join(missing)} not among the user columns "
                f"({', '.join(feat_cols) or 'none'}; {where})"
            )
    used = cfg.side_features if cfg.side_features is not None else feat_cols
    for col in cfg.bins:
        if col in used and col not in feat_cols:  # pragma: no cover - caught above
            raise ConfigError(f"bins.{col}: no such user column")



def sorted_ids(ids: Any) -> list[str]:
    """Deterministic id order: numeric when every id is an integer ("2" < "10"), else lexicographic."""
    uniq = list(dict.fromkeys(str(i) for i in ids))
    if all(s.lstrip("-").isdigit() for s in uniq):
        return sorted(uniq, key=lambda s: (int(s), s))
    return sorted(uniq)
