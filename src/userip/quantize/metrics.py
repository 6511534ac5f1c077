"""Code-usage health metrics: a codebook whose users all share a few IDs carries no profile signal."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dead_codes", "perplexity", "usage"]


def usage(idx: Tensor, k: int) -> Tensor:
    """Members per code, ``[k]`` int64, for 0-based ``idx``; codes nobody uses show up as 0, not missing."""
    idx = idx.reshape(-1).to(torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise ValueError(f"idx values must be in [0, {k - 1}]")
    return torch.bincount(idx, minlength=k)


def perplexity(idx: Tensor, k: int) -> float:
    """``exp`` of the entropy of code usage: the effective number of codes in use.

    Why this rather than a count of live codes: one code holding 99% of users with the rest spread thin
    counts as "all alive" but is nearly collapsed; perplexity reads ~1 there, ``K`` when usage is uniform.
    NaN for an empty assignment (no users, no distribution).
    """
    counts = usage(idx, k).to(torch.float64)
    total = float(counts.sum().item())
    if total == 0.0:
        return math.nan
    p = counts[counts > 0] / total
    return float(torch.exp(-(p * p.log()).sum()).item())


def dead_codes(idx: Tensor, k: int) -> Tensor:
    """0-based indices of codes with no members (LongTensor, possibly empty): the ones to reseed."""
    return torch.nonzero(usage(idx, k) == 0).flatten()
