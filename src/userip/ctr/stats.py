"""Paired bootstrap over test users and training seeds, vectorised over the replicates.

Why not a t-interval over seeds: with one fixed test set, seed-to-seed spread says nothing about which test
users happened to be drawn, so an interval over seeds alone is too narrow. Each replicate here draws the test
users with replacement (the same draw for every variant and seed: the comparison stays paired) and the seeds
with replacement, and averages the per-seed metric difference; the 2.5/97.5 percentiles of the replicates
are the 95% interval. A replicate's AUC is the weighted Mann-Whitney statistic with each row weighted by how
often its user was drawn, so a replicate costs one gather and one cumulative sum over the rows already sorted
by score, never a re-sort or a Python loop over users.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 128  # replicates per block: bounds memory at ~CHUNK x rows x 4 bytes a few times over


def weighted_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of scores ``p`` for 0/1 labels ``y`` under row weights ``weights`` ``[R, N]`` -> ``[R]``.

    Equals ``sklearn.metrics.roc_auc_score(y, p, sample_weight=w)`` for each row ``w`` (ties count one
    half); NaN where a replicate holds one class only.
    """
    y = np.asarray(y).reshape(-1)
    p = np.asarray(p).reshape(-1)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float32))
    if w.shape[1] != len(y) or len(p) != len(y):
        raise ValueError(f"weights {w.shape}, labels {len(y)} and scores {len(p)} do not line up")
    order = np.argsort(p, kind="stable")
    ps, pos = p[order], np.asarray(y[order] > 0.5)
    new = np.r_[True, ps[1:] != ps[:-1]] if len(ps) else np.zeros(0, dtype=bool)
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    start, end = starts[group], np.r_[starts[1:], len(ps)][group]  # each row's tie group [start, end)
    pos_rows = np.flatnonzero(pos)
    out = np.empty(w.shape[0], dtype=np.float64)
    for a in range(0, w.shape[0], CHUNK):
        ws = w[a : a + CHUNK][:, order]
        neg = np.where(pos, np.float32(0), ws)
        below = np.zeros((ws.shape[0], len(ps) + 1), dtype=np.float32)
        np.cumsum(neg, axis=1, out=below[:, 1:])  # below[:, i] = negative weight of rows before i
        lo, hi = below[:, start[pos_rows]], below[:, end[pos_rows]]
        num = (ws[:, pos_rows].astype(np.float64) * (lo + 0.5 * (hi - lo))).sum(1)
        den = ws[:, pos_rows].sum(1, dtype=np.float64) * neg.sum(1, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a : a + CHUNK] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return out


def weighted_logloss(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean log loss under row weights ``[R, N]`` -> ``[R]`` (probabilities clipped to [1e-7, 1 - 1e-7])."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(p, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    loss = -(y * np.log(p) + (1 - y) * np.log1p(-p))
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return (w @ loss) / w.sum(1)


@dataclass
class Replicates:
    """One set of bootstrap draws for a test slice, shared by every variant, backbone and setting."""

    row_weights: np.ndarray  # [B, N] float32: how often each row's user was drawn
    seed_weights: np.ndarray  # [B, S] how often each seed was drawn
    n_users: int

    @property
    def n(self) -> int:
        return int(self.row_weights.shape[0])


def draw_replicates(users: np.ndarray, n_seeds: int, n_boot: int, rng: np.random.Generator) -> Replicates:
    """Users drawn with replacement (as many as there are distinct users) and seeds drawn with replacement."""
    uniq, row_user = np.unique(np.asarray(users), return_inverse=True)
    u = len(uniq)
    counts = rng.multinomial(u, np.full(u, 1.0 / u), size=n_boot) if u else np.zeros((n_boot, 0))
    seeds = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot)
    return Replicates(counts[:, row_user].astype(np.float32), seeds.astype(np.float64), u)


@dataclass
class SeedMetrics:
    """A variant's metrics per seed on the full slice (``[S]``) and on each replicate (``[B, S]``)."""

    auc: np.ndarray
    logloss: np.ndarray
    auc_boot: np.ndarray
    logloss_boot: np.ndarray


def seed_metrics(y: np.ndarray, preds: np.ndarray, reps: Replicates) -> SeedMetrics:
    """``preds`` ``[S, N]`` (one row per seed, the seeds in the order of ``reps.seed_weights``' columns)."""
    ones = np.ones((1, len(y)), dtype=np.float32)
    auc = np.array([weighted_auc(y, p, ones)[0] for p in preds])
    ll = np.array([weighted_logloss(y, p, ones)[0] for p in preds])
    auc_b = np.stack([weighted_auc(y, p, reps.row_weights) for p in preds], axis=1)
    ll_b = np.stack([weighted_logloss(y, p, reps.row_weights) for p in preds], axis=1)
    return SeedMetrics(auc, ll, auc_b, ll_b)


def paired_difference(a: np.ndarray, b: np.ndarray, a_boot: np.ndarray, b_boot: np.ndarray,
                      reps: Replicates) -> tuple[float, float, float]:
    """(mean over seeds of a - b, 2.5% and 97.5% percentiles of the replicates' seed-weighted mean difference).

    The interval is NaN when more than half the replicates are undefined (a slice too small for AUC)."""
    point = float(np.mean(a - b))
    w = reps.seed_weights
    d = ((a_boot - b_boot) * w).sum(1) / w.sum(1)
    d = d[np.isfinite(d)]
    if len(d) < max(2, reps.n // 2):
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(d, [2.5, 97.5])
    return point, float(lo), float(hi)
