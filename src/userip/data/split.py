"""Train/val/test split. Decided once in ``prepare`` and stored as a column, so every stage sees the same one.

Chronological on purpose: a profile or CTR model must only ever learn from a user's past. In ``per_user``
mode each user's val/test interactions are never earlier than any of their train interactions; in ``time``
mode that holds globally.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from userip.data.config import ConfigError, SplitConfig

SPLITS = ("train", "val", "test")


def user_runs(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of each run of equal user indices in ``users`` (rows sorted by user: one run per user)."""
    users = np.asarray(users)
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return starts, np.r_[starts[1:], len(users)]


def per_user_counts(n: np.ndarray, val_frac: float, test_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """(n_val, n_test) per user: test = floor(test_frac*n) but >= 1; val = floor(val_frac*n), >= 1 if n >= 3.

    Floors (with a tiny epsilon against 0.1*30 = 2.9999...) so the held-out share never exceeds the fraction
    except for the guaranteed minimum of one.
    """
    n = np.asarray(n, dtype=np.int64)
    n_test = np.maximum(1, np.floor(n * test_frac + 1e-9).astype(np.int64))
    n_test = np.minimum(n_test, n)
    n_val = np.floor(n * val_frac + 1e-9).astype(np.int64)
    n_val = np.where(n >= 3, np.maximum(n_val, 1), n_val)
    n_val = np.minimum(n_val, n - n_test)
    return n_val, n_test


def assign_split(df: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    """Split labels for ``df`` (columns user_idx, timestamp, _row), returned in ``df``'s row order.

    Ties in timestamp are broken by the original row order (``_row``), so the split is deterministic.
    """
    if cfg.mode == "time":
        return time_split(df["timestamp"].to_numpy(), cfg)
    order = np.lexsort((df["_row"].to_numpy(), df["timestamp"].to_numpy(), df["user_idx"].to_numpy()))
    users = df["user_idx"].to_numpy()[order]
    starts, ends = user_runs(users)
    sizes = ends - starts
    pos = np.arange(len(users)) - np.repeat(starts, sizes)
    n = np.repeat(sizes, sizes)
    n_val, n_test = per_user_counts(sizes, cfg.val_frac, cfg.test_frac)
    n_val, n_test = np.repeat(n_val, sizes), np.repeat(n_test, sizes)
    lab_sorted = np.full(len(users), "train", dtype=object)
    lab_sorted[pos >= n - n_test - n_val] = "val"
    lab_sorted[pos >= n - n_test] = "test"
    out = np.empty(len(users), dtype=object)
    out[order] = lab_sorted
    return out


def resolve_cut(ts: np.ndarray, cut: float) -> int:
    """A cut in (0, 1) is a quantile of all timestamps; anything else is an absolute timestamp."""
    if 0 < cut < 1:
        return int(math.ceil(np.quantile(ts, cut)))
    return int(cut)


def time_split(ts: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Global cut: ts >= test_cut -> test, val_cut <= ts < test_cut -> val, else train."""
    if cfg.test_cut is None:
        raise ConfigError("split.test_cut: required when split.mode is 'time'")
    ts = np.asarray(ts, dtype=np.int64)
    test_cut = resolve_cut(ts, cfg.test_cut)
    val_cut = resolve_cut(ts, cfg.val_cut) if cfg.val_cut is not None else test_cut
    out = np.full(len(ts), "train", dtype=object)
    out[ts >= val_cut] = "val"
    out[ts >= test_cut] = "test"
    return out
