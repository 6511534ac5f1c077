"""A cheap history encoder for new users, distilled into the amortised map's input.

The amortised map reads z_u, the standardised mean of the frozen LLM's states over a user's train windows.
Reading those windows is the whole cost of a new user: ~0.6 s for a whole ML-100K history on 2 CPU cores.
The student reads each interaction ("Title: 4") on its own instead. Such a state is the same for every user
who had the interaction, so a catalogue's interactions are read once and cached (content-addressed, like the
pooled states), and a new user costs cache lookups plus one short pass per interaction nobody had before.

Trained as the map's own input (``pool: item``), these bag-of-items features learned a map whose profiles did
not hold on held-out users. Distilled, they only have to predict what the contextual encoder reads: a ridge
regression from a user's mean item state to their z_u, fitted on the fitted users once the fit is done, its
penalty chosen by K-fold R^2 in the maps' latent space (``B_k z``: the only directions of z that a profile
reads). The map, the codebooks and every fitted user's IDs stay the contextual encoder's; the student is used
by ``profile infer`` only, and the fit's metrics say how often its IDs agree with the fitted ones (out of fold).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from userip.errors import UseripError
from userip.io import atomic_path
from userip.paths import cache_dir
from userip.profile.pooled import digest_tensor, model_key, pool_windows, user_digest, window_items

log = logging.getLogger(__name__)

ALPHAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)


class ItemStates:
    """The frozen LLM's mean-pooled state of interactions read on their own, cached on disk by content (the
    LLM's identity and the item's token ids). An interaction's state is not personal: it is the same for every
    user who had it, and the cache holds no user id (so deleting a user has nothing to remove here)."""

    def __init__(self, llm, batch_size: int = 256, cache: Path | str | None = "default") -> None:
        self.llm, self.batch_size = llm, batch_size
        self.key = model_key(llm, "item-alone")
        if cache == "default":
            cache = cache_dir("items") / f"{self.key}.safetensors"
        self.path = Path(cache) if cache is not None else None
        self._mem: dict[bytes, torch.Tensor] | None = None

    def _load(self) -> dict[bytes, torch.Tensor]:
        if self._mem is not None:
            return self._mem
        self._mem = {}
        if self.path is not None and self.path.exists():
            try:
                t = load_file(str(self.path))
                d = t["digests"].numpy()
                self._mem = {d[i].tobytes(): t["states"][i] for i in range(len(d))}
            except Exception as e:  # a corrupt cache is recomputed, never trusted
                log.warning("ignoring unreadable item-state cache %s (%s)", self.path, e)
        return self._mem

    def get(self, items: list[tuple[int, ...]], progress: bool = False) -> torch.Tensor:
        """[N, H] fp32 states of ``items`` (token id tuples); reads (and caches) only the ones not seen before."""
        mem = self._load()
        keys = [user_digest([list(t)]) for t in items]  # an item keyed as a one-window history
        todo = {k: t for k, t in zip(keys, items, strict=True) if k not in mem}
        if todo:
            log.info("reading %d interactions on their own (%d cached)", len(todo), len(set(keys)) - len(todo))
            states = pool_windows(self.llm, [list(t) for t in todo.values()], "mean", self.batch_size, progress)
            mem.update({k: states[i].clone() for i, k in enumerate(todo)})
            if self.path is not None:
                order = sorted(mem)
                tensors = {"digests": digest_tensor(order), "states": torch.stack([mem[k] for k in order]).contiguous()}
                with atomic_path(self.path) as tmp:
                    save_file(tensors, str(tmp), metadata={"key": self.key})
        if not items:
            return torch.zeros(0, self.llm.hidden_size)
        return torch.stack([mem[k] for k in keys])


def item_features(llm, windows: dict[int, list[list[int]]], states: ItemStates, progress: bool = False
                  ) -> dict[int, torch.Tensor]:
    """Per user, the mean over their windows of the mean state of each window's interactions, each read on its
    own (the window's text split at the item separator, as ``pool: item`` reads it)."""
    split = {u: [[tuple(t) for t in window_items(llm.tokenizer, w)] for w in ws] for u, ws in windows.items()}
    distinct = list(dict.fromkeys(t for ws in split.values() for items in ws for t in items))
    table = states.get(distinct, progress=progress)
    row = {t: i for i, t in enumerate(distinct)}
    out = {}
    for u, ws in split.items():
        if not ws:
            out[u] = torch.zeros(llm.hidden_size)
            continue
        out[u] = torch.stack([table[[row[t] for t in items]].mean(0) for items in ws]).mean(0)
    return out


@dataclass
class HistoryStudent:
    """z = ((x - x_mean) / x_std) @ coef[k].T + intercept[k]: ridge regressions from a user's mean item state x
    to the contextual encoder's z, one per cross-fitting fold k (trained on the users outside fold k, as the
    maps are): a fitted user is read by the student of their fold, which never saw them, a new user by the
    average of the students."""

    x_mean: torch.Tensor
    x_std: torch.Tensor
    coef: torch.Tensor  # [K, d, H]
    intercept: torch.Tensor  # [K, d]
    alpha: float

    def predict(self, x: torch.Tensor, folds: torch.Tensor | None = None) -> torch.Tensor:
        """[B, d] z of rows ``x`` [B, H], each by the student of ``folds[i]`` (None or -1: the average)."""
        xs = (x - self.x_mean) / self.x_std
        every = torch.einsum("bh,kdh->kbd", xs, self.coef) + self.intercept[:, None]
        out = every.mean(0)
        if folds is not None:
            own = (folds >= 0) & (folds < len(self.coef))
            rows = own.nonzero().flatten()
            out[rows] = every[folds[rows], rows]
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"student.x_mean": self.x_mean, "student.x_std": self.x_std, "student.coef": self.coef,
                "student.intercept": self.intercept, "student.alpha": torch.tensor(self.alpha)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> HistoryStudent | None:
        if "student.coef" not in t:
            return None
        return cls(t["student.x_mean"].clone(), t["student.x_std"].clone(), t["student.coef"].clone(),
                   t["student.intercept"].clone(), float(t["student.alpha"]))


def latent_r2(z: torch.Tensor, pred: torch.Tensor, latents: list[torch.Tensor]) -> list[float]:
    """R^2 of ``pred`` against ``z`` in each latent space ``B`` [r, d] (B z: what a map reads of z)."""
    out = []
    for B in latents:
        a, b = z @ B.T, pred @ B.T
        out.append(float(1 - ((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum().clamp(min=1e-12)))
    return out


def fit_student(x: torch.Tensor, z: torch.Tensor, latents: list[torch.Tensor], groups: torch.Tensor,
                alphas: tuple[float, ...] = ALPHAS, folds: int = 5, seed: int = 0
                ) -> tuple[HistoryStudent, torch.Tensor, dict]:
    """Ridge from ``x`` [N, H] to ``z`` [N, d]. The penalty is chosen by ``folds``-fold R^2 in ``latents`` (the
    mean over them); then one student per cross-fitting group (``groups`` [N] in 0..K-1: student k fits the
    rows outside group k; K = 1: one student on every row). Returns the students, each row's prediction by the
    student that did not see it (K = 1: out of fold at the chosen penalty), and the selection metrics."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold

    n, K = len(x), int(groups.max()) + 1 if len(groups) else 1
    if n < max(folds, 2) or (K > 1 and int(torch.bincount(groups, minlength=K).max()) >= n):
        raise UseripError(f"profile.student: needs at least {max(folds, 2)} fitted users in more than one "
                          f"cross-fitting fold to fit on users it is not read on, got {n}")
    x_mean, x_std = x.mean(0), x.std(0).clamp(min=1e-6)
    X, Z = ((x - x_mean) / x_std).double().numpy(), z.double().numpy()
    splits = list(KFold(folds, shuffle=True, random_state=seed).split(X))
    if K > 1:  # the deployed students' own split: each row predicted by the student that never saw it
        g = groups.numpy()
        final_splits = [((g != k).nonzero()[0], (g == k).nonzero()[0]) for k in range(K)]
    else:
        final_splits = splits
    scores, held_out = {}, {}
    for alpha in alphas:
        pred = np.zeros_like(Z)
        for tr, te in splits:
            pred[te] = Ridge(alpha=alpha).fit(X[tr], Z[tr]).predict(X[te])
        held_out[alpha] = pred
        scores[alpha] = latent_r2(z, torch.tensor(pred, dtype=torch.float32), latents)
    best = max(alphas, key=lambda a: float(np.mean(scores[a])))
    coef, icpt, pred = [], [], np.zeros_like(Z)
    models = [Ridge(alpha=best).fit(X[tr], Z[tr]) for tr, _ in final_splits]
    for (_, te), m in zip(final_splits, models, strict=True):
        pred[te] = m.predict(X[te])
    if K == 1:
        models = [Ridge(alpha=best).fit(X, Z)]
    coef = torch.tensor(np.stack([m.coef_ for m in models]), dtype=torch.float32)
    icpt = torch.tensor(np.stack([m.intercept_ for m in models]), dtype=torch.float32)
    student = HistoryStudent(x_mean, x_std, coef, icpt, float(best))
    oof = torch.tensor(pred, dtype=torch.float32)
    metrics = {"alpha": float(best), "cv_folds": folds, "students": len(models),
               "cv_latent_r2": {str(a): [round(s, 4) for s in v] for a, v in scores.items()},
               "held_out_latent_r2": [round(s, 4) for s in latent_r2(z, oof, latents)]}
    return student, oof, metrics
