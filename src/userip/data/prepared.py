"""`prepare` (raw logs -> DATA dir) and `PreparedData` (the DATA dir in memory), plus stats helpers.

The DATA dir is the only thing later stages read, so it is self-describing: the three tables, the id maps,
the split, the stats and the exact `DataConfig` that produced them. It is written with `userip.io.output_dir`
(built in a temp dir, moved in, then marked complete), so a crash never leaves a half-written directory
that a later stage could mistake for a complete one, and files userip did not write are never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.data.config import ConfigError, DataConfig
from userip.data.readers import RawTables, check_tables, read_generic
from userip.data.split import SPLITS, assign_split, resolve_cut
from userip.errors import InputError, UseripError
from userip.io import (
    OUTPUT_FILES,
    check_output_dir,
    output_dir,
    read_json,
    read_yaml,
    require_complete,
    write_json,
    write_yaml,
)

log = logging.getLogger(__name__)

DATA_FILES = OUTPUT_FILES["data"]


# ---------------------------------------------------------------------------------------------- PreparedData
@dataclass(eq=False)
class PreparedData:
    """A prepared dataset: dense ids (1..n, 0 = unknown/padding), a fixed split, and the config behind them.

    ``interactions``: user_idx, item_idx, rating (float32), label (int8), timestamp (int64), split, [text];
    sorted by user_idx, then timestamp, then original row order. ``items``: item_idx, item_id, title,
    genres (list[str]), year, [text]. ``users``: user_idx, user_id, side features.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    stats: dict[str, Any]
    config: DataConfig
    id_maps: dict[str, Any]
    path: Path | None = None
    _user_lookup: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _item_lookup: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._user_lookup = {str(k): int(v) for k, v in self.id_maps["user"].items()}
        self._item_lookup = {str(k): int(v) for k, v in self.id_maps["item"].items()}
        self._user_ids = np.array([""] + list(self.users.sort_values("user_idx")["user_id"]), dtype=object)
        self._item_ids = np.array([""] + list(self.items.sort_values("item_idx")["item_id"]), dtype=object)

    def __repr__(self) -> str:
        return (
            f"PreparedData(dataset={self.stats.get('dataset')!r}, interactions={len(self.interactions)}, "
            f"users={self.n_users}, items={self.n_items}, path={str(self.path) if self.path else None!r})"
        )

    @property
    def n_users(self) -> int:
        """Largest dense user index (embedding tables need n_users + 1 rows)."""
        return len(self._user_ids) - 1

    @property
    def n_items(self) -> int:
        return len(self._item_ids) - 1

    @property
    def genre_vocab(self) -> list[str]:
        """Genre names; genre code ``i + 1`` is ``genre_vocab[i]`` (0 = padding)."""
        return list(self.id_maps.get("genre", []))

    @property
    def fingerprint(self) -> str:
        """What "built on the same data" checks compare (profiles, bank, baselines, CTR, serving).

        ``v2:`` + sha256 over the id sets and every interaction's user, item, time, rating, label and split
        (`fingerprint_data`): a re-split or relabelled dataset gets another fingerprint. A DATA dir written
        before v2 (its stats have no ``fingerprint_version``) keeps its ids-only fingerprint, so what was built
        on it still matches; re-prepare it to get the full one (then rebuild what was built on it).
        """
        if self._fingerprint is None:
            if fingerprint_version(self.stats) >= 2:
                self._fingerprint = fingerprint_data(self._user_lookup, self._item_lookup, self.interactions)
            else:
                self._fingerprint = fingerprint_ids(self._user_lookup, self._item_lookup)
        return self._fingerprint

    @property
    def has_text(self) -> bool:
        return "text" in self.interactions.columns or "text" in self.items.columns

    def user_index(self, ids: Any) -> np.ndarray:
        """Original user ids (str or int) -> dense int64 indices, 0 for unknown users."""
        return np.array([self._user_lookup.get(str(i), 0) for i in _as_list(ids)], dtype=np.int64)

    def item_index(self, ids: Any) -> np.ndarray:
        return np.array([self._item_lookup.get(str(i), 0) for i in _as_list(ids)], dtype=np.int64)

    def user_ids(self, idx: Any) -> list[str]:
        """Dense indices -> original ids (strings). Index 0 or out of range is an error, not a blank."""
        return _lookup(self._user_ids, idx, "user")

    def item_ids(self, idx: Any) -> list[str]:
        return _lookup(self._item_ids, idx, "item")

    def split(self, name: str) -> pd.DataFrame:
        """Interactions of one split (``train``, ``val``, ``test``)."""
        if name not in SPLITS:
            raise UseripError(f"unknown split '{name}'; expected one of {', '.join(SPLITS)}")
        return self.interactions[self.interactions["split"] == name]


def _as_list(x: Any) -> list:
    if isinstance(x, (str, int, np.integer)):
        return [x]
    return list(x)


def _lookup(table: np.ndarray, idx: Any, noun: str) -> list[str]:
    arr = np.asarray(_as_list(idx), dtype=np.int64)
    bad = (arr < 1) | (arr >= len(table))
    if bad.any():
        raise UseripError(f"{noun} index {int(arr[bad][0])} is out of range 1..{len(table) - 1}")
    return [str(s) for s in table[arr]]


FINGERPRINT_VERSION = 2
_FINGERPRINT_PREFIX = f"v{FINGERPRINT_VERSION}:"


def fingerprint_version(stats: dict[str, Any] | None) -> int:
    """The fingerprint definition a DATA dir's stats were written with (1 = ids only, before it was recorded)."""
    return int((stats or {}).get("fingerprint_version", 1))


def fingerprint_ids(user_map: dict[str, int] | list[str], item_map: dict[str, int] | list[str]) -> str:
    """Version 1: sha256 over the sorted user and item ids only (DATA dirs written before version 2)."""
    return _hash_ids(user_map, item_map).hexdigest()


def _hash_ids(user_map: dict[str, int] | list[str], item_map: dict[str, int] | list[str]) -> Any:
    h = hashlib.sha256()
    for name, ids in (("users", user_map), ("items", item_map)):
        h.update(f"{name}\n".encode())
        for s in sorted(str(i) for i in ids):
            h.update(s.encode("utf-8") + b"\n")
    return h


def fingerprint_data(user_map: dict[str, int], item_map: dict[str, int], interactions: pd.DataFrame) -> str:
    """Version 2: ``v2:`` + sha256 over the id sets and every interaction (user, item, timestamp, rating,
    label, split), in a canonical order so the input's row order does not matter.

    Dense indices stand for the ids: they are a fixed function of the id sets hashed first (`sorted_ids`).
    Review text is left out: it changes neither the split nor the labels that fits and banks depend on.
    """
    h = _hash_ids(user_map, item_map)
    inter = interactions
    split_code = pd.Categorical(inter["split"], categories=list(SPLITS)).codes.astype(np.int64)
    rating = inter["rating"].to_numpy(dtype="float64")
    cols = [
        inter["user_idx"].to_numpy(dtype=np.int64),
        inter["item_idx"].to_numpy(dtype=np.int64),
        inter["timestamp"].to_numpy(dtype=np.int64),
        np.where(np.isnan(rating), -1.0, rating).view(np.int64),  # one bit pattern for every missing rating
        inter["label"].to_numpy(dtype=np.int64),
        split_code,
    ]
    table = np.stack(cols, axis=1) if len(inter) else np.zeros((0, len(cols)), dtype=np.int64)
    order = np.lexsort(table.T[::-1])  # rows sorted by user, item, time, rating, label, split
    h.update(b"interactions\n")
    h.update(np.ascontiguousarray(table[order]).astype("<i8").tobytes())
    return _FINGERPRINT_PREFIX + h.hexdigest()


def fingerprint_mismatch(what: str, recorded: Any, data_fingerprint: str) -> str:
    """The message for "``what`` was built on other data", saying so when only the definition differs."""
    recorded = str(recorded)
    new_what, new_data = recorded.startswith(_FINGERPRINT_PREFIX), data_fingerprint.startswith(_FINGERPRINT_PREFIX)
    if new_data and not new_what:
        return (f"{what} was built by an older userip whose data fingerprint covered only the user and item ids "
                f"({recorded[:12]}), while this data's covers the split and labels too ({data_fingerprint[:15]}): "
                "userip cannot tell whether it was built on this split. Rebuild it from this data, or use the "
                "DATA directory it was built from")
    if new_what and not new_data:
        return (f"{what} records a split-and-label fingerprint ({recorded[:15]}), but this DATA directory was "
                f"prepared by an older userip (ids-only fingerprint {data_fingerprint[:12]}): use the DATA "
                "directory it was built from, or re-prepare this one (`userip data prepare ... --overwrite`)")
    return (f"{what} was built on other data: data fingerprint {recorded[:15]} != {data_fingerprint[:15]} of "
            "this data (other users, items, split or labels); rebuild it from this data")


def sorted_ids(ids: Any) -> list[str]:
    """Deterministic id order: numeric when every id is an integer ("2" < "10"), else lexicographic."""
    uniq = list(dict.fromkeys(str(i) for i in ids))
    if all(s.lstrip("-").isdigit() for s in uniq):
        return sorted(uniq, key=lambda s: (int(s), s))
    return sorted(uniq)


# ---------------------------------------------------------------------------------------------- prepare
PathLike = str | os.PathLike


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


def write_prepared(data: PreparedData, out: PathLike, *, overwrite: bool = False) -> None:
    """Write all DATA files into a temp dir, moved into ``out`` only once everything is written."""
    split_info: dict[str, Any] = {
        "config": data.config.to_dict()["split"],
        "counts": {s: data.stats["splits"][s]["interactions"] for s in SPLITS},
        "users": {s: data.stats["splits"][s]["users"] for s in SPLITS},
    }
    if data.config.split.mode == "time":
        ts = data.interactions["timestamp"].to_numpy()
        cfg = data.config.split
        split_info["resolved_cuts"] = {
            "val_cut": resolve_cut(ts, cfg.val_cut) if cfg.val_cut is not None else None,
            "test_cut": resolve_cut(ts, cfg.test_cut),
        }
    with output_dir(out, "data", overwrite=overwrite) as tmp:
        data.interactions.to_parquet(tmp / "interactions.parquet", index=False)
        data.items.to_parquet(tmp / "items.parquet", index=False)
        data.users.to_parquet(tmp / "users.parquet", index=False)
        write_json(tmp / "id_maps.json", data.id_maps)
        write_json(tmp / "split.json", split_info)
        write_json(tmp / "stats.json", data.stats)
        write_yaml(tmp / "config.yaml", data.config.to_dict())


# ---------------------------------------------------------------------------------------------- loading
def load_prepared(path: PathLike) -> PreparedData:
    """Load a DATA dir written by `prepare`; a missing or incomplete dir is a clear `InputError`."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(
            path, "prepared data directory not found (run `userip data prepare --out DIR` first)"
        )
    require_complete(path, "prepared data")
    missing = [f for f in DATA_FILES if not (path / f).is_file()]
    if missing:
        raise InputError(path, f"incomplete prepared data directory: missing {', '.join(missing)}")
    try:
        inter = pd.read_parquet(path / "interactions.parquet")
        items = pd.read_parquet(path / "items.parquet")
        users = pd.read_parquet(path / "users.parquet")
    except Exception as e:
        raise InputError(path, f"cannot read prepared tables ({type(e).__name__}: {e})") from None
    items["genres"] = [[str(g) for g in gs] if gs is not None else [] for gs in items["genres"]]
    inter["split"] = inter["split"].astype(object)
    saved = read_yaml(path / "config.yaml") or {}
    saved.pop("windows", None)  # written by userip < 0.2, never read
    saved.pop("history_len", None)  # likewise (the CTR's is ctr.history_len)
    cfg = DataConfig.from_dict(saved, base=DataConfig())
    data = PreparedData(
        inter, items, users, read_json(path / "stats.json"), cfg, read_json(path / "id_maps.json"), path
    )
    version = fingerprint_version(data.stats)
    if version > FINGERPRINT_VERSION:
        raise InputError(path / "stats.json", f"fingerprint_version {version} is newer than this userip reads "
                         f"({FINGERPRINT_VERSION}); upgrade userip", field="fingerprint_version")
    if data.stats.get("fingerprint") != data.fingerprint:
        raise InputError(
            path / "stats.json",
            "fingerprint does not match id_maps.json and interactions.parquet (files from different runs?)",
            field="fingerprint",
        )
    if version < FINGERPRINT_VERSION:
        log.warning("%s: prepared by an older userip; its fingerprint covers only the user and item ids, so a "
                    "re-split copy of it would pass the 'built on the same data' checks. Re-prepare it (--overwrite) "
                    "for a fingerprint of the split and labels too, then rebuild what was built on it", path)
    return data


def load_stats(path: PathLike) -> dict[str, Any]:
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
