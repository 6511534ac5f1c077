"""CTR inputs: the feature tables of the data, and one row per interaction of a split built from them.

``feature_tables`` is the one builder of the per-user and per-item tables (genre codes, side-feature codes,
vocabulary sizes) that every CTR input is gathered from: ``ctr_examples`` gathers training rows from them
and ``userip.serve`` gathers served rows from them, so a served input cannot drift from a trained one. The
history of a row is the one thing that differs: a logged event's history is what came strictly before it
(``history_matrix``), a served request's is the user's latest items (``latest_history``).

All vocabularies (genres, side-feature values) are fixed from the full items/users tables, never from one
split, so train/val/test share the same codes and embedding-table sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from userip.data.prepared import PreparedData
from userip.data.split import SPLITS
from userip.errors import UseripError


@dataclass(eq=False)
class CTRExamples:
    """Arrays of equal length N. ``genres`` [N, G] and ``history`` [N, H] are 0-padded.

    ``vocab`` holds embedding-table sizes including index 0 (``user``, ``item``, ``genre``, each side field).
    """

    user: np.ndarray
    item: np.ndarray
    genres: np.ndarray
    history: np.ndarray
    side: dict[str, np.ndarray]
    label: np.ndarray
    timestamp: np.ndarray
    vocab: dict[str, int]
    split: str = ""
    side_values: dict[str, list[str]] = field(default_factory=dict)  # code i+1 -> side_values[f][i]

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def subset(self, mask: Any) -> CTRExamples:
        """Rows selected by a boolean mask or an index array (vocabularies unchanged)."""
        m = np.asarray(mask)
        if m.dtype == bool and m.shape != (len(self),):
            raise ValueError(f"mask has shape {m.shape}, expected ({len(self)},)")
        return CTRExamples(
            user=self.user[m],
            item=self.item[m],
            genres=self.genres[m],
            history=self.history[m],
            side={k: v[m] for k, v in self.side.items()},
            label=self.label[m],
            timestamp=self.timestamp[m],
            vocab=dict(self.vocab),
            split=self.split,
            side_values={k: list(v) for k, v in self.side_values.items()},
        )


def side_feature_codes(
    data: PreparedData,
) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, list[str]]]:
    """Per side field: codes indexed by user_idx ([n_users + 1], row 0 = 0), vocab size, value names.

    Numeric fields listed in ``config.bins`` are bucketed (code = bucket + 1; ML-100K age -> 7 bins), the rest
    are categorical over the sorted distinct values of the users table. Missing values -> 0 (unknown).
    """
    cfg = data.config
    users = data.users
    fields = (
        cfg.side_features
        if cfg.side_features is not None
        else [c for c in users.columns if c not in ("user_idx", "user_id")]
    )
    idx = users["user_idx"].to_numpy(dtype=np.int64)
    codes, vocab, names = {}, {}, {}
    for f in fields:
        if f in ("user", "item", "genre"):
            raise UseripError(
                f"side feature '{f}' clashes with a built-in vocab name; rename the users column"
            )
        if f not in users.columns:
            raise UseripError(f"side feature '{f}' is not a users column ({', '.join(users.columns)})")
        col = users[f]
        table = np.zeros(data.n_users + 1, dtype=np.int64)
        if f in cfg.bins:
            edges = np.asarray(cfg.bins[f], dtype="float64")
            vals = pd.to_numeric(col, errors="coerce").to_numpy(dtype="float64")
            c = np.searchsorted(edges, vals, side="right") + 1
            c[np.isnan(vals)] = 0
            table[idx] = c
            vocab[f] = len(edges) + 2
            bounds = [-np.inf, *edges.tolist(), np.inf]
            names[f] = [f"[{_fmt(lo)}, {_fmt(hi)})" for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        else:
            vals = [None if pd.isna(v) else str(v) for v in col]
            values = sorted({v for v in vals if v is not None and v != ""})
            lut = {v: i for i, v in enumerate(values, start=1)}
            table[idx] = [lut.get(v, 0) if v is not None else 0 for v in vals]
            vocab[f] = len(values) + 1
            names[f] = values
        codes[f] = table
    return codes, vocab, names


def _fmt(x: float) -> str:
    if np.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}"


def genre_matrix(data: PreparedData) -> np.ndarray:
    """[n_items + 1, G] genre codes per item_idx (1..n_genres, 0-padded on the right); G = max per item."""
    lut = {g: i for i, g in enumerate(data.genre_vocab, start=1)}
    g_max = max([len(gs) for gs in data.items["genres"]] + [1])
    mat = np.zeros((data.n_items + 1, g_max), dtype=np.int64)
    for idx, gs in zip(data.items["item_idx"].to_numpy(), data.items["genres"], strict=True):
        for j, g in enumerate(gs):
            mat[idx, j] = lut[g]
    return mat


@dataclass(eq=False)
class FeatureTables:
    """Per-item and per-user lookup tables of one DATA dir (row 0 = unknown, all codes 0)."""

    genres: np.ndarray  # [n_items + 1, G] genre codes of each item_idx (``genre_matrix``)
    side: dict[str, np.ndarray]  # side field -> code of each user_idx, [n_users + 1] (``side_feature_codes``)
    vocab: dict[str, int]  # embedding-table sizes including index 0: user, item, genre, each side field
    side_values: dict[str, list[str]]  # code i+1 -> side_values[f][i]

    def rows(self, user: np.ndarray, item: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """For rows (user_idx, item_idx): the item's genre codes [N, G] and the user's code per side field."""
        return self.genres[item], {f: table[user] for f, table in self.side.items()}


def feature_tables(data: PreparedData) -> FeatureTables:
    """The feature tables of ``data``: what training (``ctr_examples``) and serving both read."""
    codes, side_vocab, names = side_feature_codes(data)
    vocab = {"user": data.n_users + 1, "item": data.n_items + 1, "genre": len(data.genre_vocab) + 1, **side_vocab}
    return FeatureTables(genre_matrix(data), codes, vocab, names)


def history_matrix(inter: pd.DataFrame, history_len: int) -> np.ndarray:
    """[N, H] item_idx the user interacted with strictly earlier in time (any split), most recent last.

    ``inter`` must be sorted by user_idx then timestamp (as `PreparedData.interactions` is). Events with the
    same timestamp are not each other's history: at serving time neither would be known before the other.
    """
    n = len(inter)
    h = np.zeros((n, history_len), dtype=np.int64)
    if n == 0 or history_len == 0:
        return h
    users = inter["user_idx"].to_numpy()
    ts = inter["timestamp"].to_numpy()
    items = inter["item_idx"].to_numpy(dtype=np.int64)
    new_user = np.r_[True, users[1:] != users[:-1]]
    new_ts = new_user | np.r_[True, ts[1:] != ts[:-1]]
    pos = np.arange(n)
    user_start = np.maximum.accumulate(np.where(new_user, pos, 0))
    tie_start = np.maximum.accumulate(np.where(new_ts, pos, 0))  # first row of this (user, timestamp) group
    src = tie_start[:, None] - history_len + np.arange(history_len)[None, :]
    valid = src >= user_start[:, None]
    h[valid] = items[src[valid]]
    return h


def latest_history(data: PreparedData, history_len: int, *, split: str | None = None) -> np.ndarray:
    """[n_users + 1, H] each user's H most recent items (time order, most recent last, 0-padded on the left):
    the history of a request scored now. ``split`` keeps only that split's events (e.g. "train")."""
    table = np.zeros((data.n_users + 1, history_len), dtype=np.int64)
    inter = data.interactions
    if split is not None:
        inter = inter[inter["split"] == split]
    if history_len == 0 or len(inter) == 0:
        return table
    inter = inter.sort_values(["user_idx", "timestamp"], kind="stable")
    rank = inter.groupby("user_idx", sort=False).cumcount(ascending=False).to_numpy()
    keep = rank < history_len
    users = inter["user_idx"].to_numpy(dtype=np.int64)[keep]
    table[users, history_len - 1 - rank[keep]] = inter["item_idx"].to_numpy(dtype=np.int64)[keep]
    return table


def ctr_examples(data: PreparedData, split: str, *, history_len: int = 20) -> CTRExamples:
    """CTR rows for ``split`` ("train", "val", "test" or "all").

    label = rating >= ``label_threshold`` (or the given label column, already applied in ``prepare``).
    History is computed over all splits: what a user did before an event is known when serving it.
    """
    if split not in (*SPLITS, "all"):
        raise UseripError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)} or 'all'")
    if not isinstance(history_len, int) or history_len < 0:
        raise UseripError(f"history_len must be an integer >= 0, got {history_len!r}")
    inter = data.interactions
    if not (np.diff(inter["user_idx"].to_numpy()) >= 0).all():  # pragma: no cover - prepare guarantees it
        inter = inter.sort_values(["user_idx", "timestamp"], kind="stable").reset_index(drop=True)
    hist = history_matrix(inter, history_len)
    mask = np.ones(len(inter), dtype=bool) if split == "all" else (inter["split"] == split).to_numpy()
    rows = inter[mask]
    user = rows["user_idx"].to_numpy(dtype=np.int64)
    item = rows["item_idx"].to_numpy(dtype=np.int64)
    tables = feature_tables(data)
    genres, side = tables.rows(user, item)
    return CTRExamples(
        user=user,
        item=item,
        genres=genres,
        history=hist[mask],
        side=side,
        label=rows["label"].to_numpy(dtype=np.float32),
        timestamp=rows["timestamp"].to_numpy(dtype=np.int64),
        vocab=dict(tables.vocab),
        split=split,
        side_values=tables.side_values,
    )
