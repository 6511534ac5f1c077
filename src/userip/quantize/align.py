"""Keep profile IDs meaningful across refits: relabel a new codebook so its codes reuse the old IDs.

k-means labels are arbitrary: two fits of the same users (another seed, a month more of logs) can find the same
clusters under permuted labels, and a CTR model trained on last month's IDs would then read this month's code 3 as
something else. :func:`match_codes` finds the relabelling of the new codes that keeps as many IDs as possible
(Hungarian matching, ``scipy.optimize.linear_sum_assignment``), :func:`apply_relabel` permutes a codebook and its
IDs by it. Only labels change: the codebook's rows are permuted, never moved, so every user keeps their cluster.

Which similarity the matching uses, and why:

- ``users`` (preferred): the contingency of old vs new IDs over the users both fits hold. Maximising it is
  maximising exactly the number of users whose ID survives, the quantity a downstream model cares about, and it
  needs nothing from the two fits' vector spaces. Those spaces generally differ: codewords live in the space of
  the *centred, L2-normalised* personal part, and the centre moves with the data; the personal part itself is only
  identified up to what the frozen LLM reads the same (a refit from another seed or with a retrained map can land
  on rotated directions), and a refit with another LLM or hidden size has no common space at all.
- ``codewords`` (fallback, when too few users are shared, e.g. a refit on a new cohort): cosine similarity of
  old and new codewords, meaningful only when both fits quantise the same space (same LLM and hidden size).
  Within ``users`` the codeword cosine only breaks ties between equal counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["CodeMatch", "apply_relabel", "contingency", "match_codes"]

# below this many shared users per new code the contingency is too thin to trust over codeword similarity
MIN_SHARED_PER_CODE = 2


@dataclass(frozen=True)
class CodeMatch:
    """The relabelling of one profile's new codes and what it kept.

    ``relabel[i]`` is the 1-based ID new code ``i`` (0-based row of the new codebook) is given. ``changed`` /
    ``changed_raw`` count the shared users whose ID differs from their old one after / without the relabelling;
    ``agreement`` is ``1 - changed / shared`` (None when no user is shared)."""

    relabel: list[int]
    method: str  # users | codewords | identity
    shared: int
    changed: int
    changed_raw: int
    agreement: float | None
    codeword_cosine: list[float] | None  # cosine of each new code with the old code whose ID it took

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def contingency(old_ids: np.ndarray, new_ids: np.ndarray, k_old: int, k_new: int) -> np.ndarray:
    """``[k_new, k_old]`` counts of users with new ID ``i+1`` and old ID ``j+1``; ID 0 (unknown) is skipped."""
    old_ids, new_ids = np.asarray(old_ids, dtype=np.int64), np.asarray(new_ids, dtype=np.int64)
    if old_ids.shape != new_ids.shape:
        raise ValueError(f"old and new IDs must align user by user, got {old_ids.shape} vs {new_ids.shape}")
    keep = (old_ids > 0) & (new_ids > 0)
    if (old_ids[keep] > k_old).any() or (new_ids[keep] > k_new).any():
        raise ValueError(f"IDs out of range: old must be in 0..{k_old}, new in 0..{k_new}")
    c = np.zeros((k_new, k_old), dtype=np.int64)
    np.add.at(c, (new_ids[keep] - 1, old_ids[keep] - 1), 1)
    return c


def _cosine(a: Tensor, b: Tensor) -> np.ndarray:
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return (a @ b.t()).numpy()


def match_codes(old_ids: np.ndarray, new_ids: np.ndarray, k_old: int, k_new: int, *,
                old_codes: Tensor | None = None, new_codes: Tensor | None = None,
                min_shared_per_code: int = MIN_SHARED_PER_CODE) -> CodeMatch:
    """Relabel the new codes so they keep the old IDs where they can.

    ``old_ids`` / ``new_ids``: 1-based IDs of the same users (one entry per user both fits know; 0 = not in that
    fit). ``old_codes`` / ``new_codes``: the two codebooks ``[k_old, D]`` / ``[k_new, D]`` when they share a
    space (pass None otherwise). Contingency matching is used when at least ``min_shared_per_code * k_new``
    users are shared; else codeword similarity; else the identity. When the sizes differ, new codes matched to
    an old code keep its ID (only IDs ``<= k_new`` can survive a smaller codebook) and the rest take the free IDs
    in order.
    """
    if k_old < 1 or k_new < 1:
        raise ValueError(f"codebook sizes must be >= 1, got k_old={k_old}, k_new={k_new}")
    c = contingency(old_ids, new_ids, k_old, k_new)
    shared = int(c.sum())
    cols = min(k_old, k_new)  # old IDs a codebook of k_new codes can keep
    sim = None
    if old_codes is not None and new_codes is not None and old_codes.shape[1] == new_codes.shape[1]:
        if old_codes.shape[0] != k_old or new_codes.shape[0] != k_new:
            raise ValueError("codebook rows do not match k_old / k_new")
        sim = _cosine(new_codes, old_codes)  # [k_new, k_old]
    if shared >= min_shared_per_code * k_new:
        method = "users"
        # counts decide; the cosine (|.| <= 1, times 1e-3 over at most k codes) can only break exact ties
        score = c.astype(np.float64) + (1e-3 / max(k_new, 1)) * (sim if sim is not None else 0.0)
    elif sim is not None:
        method, score = "codewords", sim
    else:
        method, score = "identity", None
    relabel = np.full(k_new, -1, dtype=np.int64)
    if score is not None:
        from scipy.optimize import linear_sum_assignment

        rows, taken = linear_sum_assignment(score[:, :cols], maximize=True)
        relabel[rows] = taken
    else:
        relabel[:cols] = np.arange(cols)
    free = iter(sorted(set(range(k_new)) - set(relabel[relabel >= 0].tolist())))
    for i in range(k_new):  # unmatched new codes (k_new > k_old) take the unused IDs, lowest first
        if relabel[i] < 0:
            relabel[i] = next(free)
    changed_raw = shared - int(np.trace(c[:cols, :cols]))
    changed = shared - int(sum(c[i, relabel[i]] for i in range(k_new) if relabel[i] < k_old))
    cos = [float(sim[i, relabel[i]]) if relabel[i] < k_old else float("nan") for i in range(k_new)] \
        if sim is not None else None
    return CodeMatch(
        relabel=(relabel + 1).tolist(), method=method, shared=shared, changed=changed, changed_raw=changed_raw,
        agreement=(1.0 - changed / shared) if shared else None, codeword_cosine=cos,
    )


def apply_relabel(codes: Tensor, ids: Tensor, relabel: list[int]) -> tuple[Tensor, Tensor]:
    """Permute a ``[K, D]`` codebook and 1-based ``ids`` (0 = unknown, kept) by ``relabel`` (new code i -> ID).

    Row ``relabel[i] - 1`` of the returned codebook is the old row ``i``, so nearest-code assignment against the
    returned codebook gives exactly the relabelled IDs: inference of new users stays consistent with the bank.
    """
    k = codes.shape[0]
    perm = torch.as_tensor(relabel, dtype=torch.long) - 1
    if sorted(perm.tolist()) != list(range(k)):
        raise ValueError(f"relabel must be a permutation of 1..{k}, got {relabel}")
    out = torch.empty_like(codes)
    out[perm.to(codes.device)] = codes
    lut = torch.cat([torch.zeros(1, dtype=torch.long), perm + 1]).to(ids.device)
    return out, lut[ids.long()]
