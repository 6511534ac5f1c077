"""Per-profile codebooks: k-means over users' personal soft-token vectors, fitted as the EM M-step.

Every function takes an explicit ``torch.Generator`` (or ``None`` for torch's global RNG) and draws its
random numbers from it on the generator's own device, so a fit is reproducible from ``seed.torch_generator``
whatever device the data lives on. Large inputs are processed in row chunks so that ``N = 1e6`` users never
materialise an ``[N, K]`` distance matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from userip.quantize.metrics import perplexity

__all__ = [
    "Codebook",
    "MStepStats",
    "assign",
    "code_sums",
    "kmeans_pp_init",
    "prepare_for_codes",
    "reseed_dead",
    "update_from_sums",
]

# Elements per temporary block (~64 MiB of fp32); bounds memory of the [chunk, K] / [chunk, D] temporaries.
_CHUNK_ELEMENTS = 1 << 24


def _check_matrix(x: Tensor, name: str = "x") -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _work_dtype(x: Tensor) -> torch.dtype:
    # Half-precision inputs are fine to store (memory) but distances/means must be computed in >= fp32.
    return torch.promote_types(x.dtype, torch.float32)


def _rows_per_chunk(width: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, _CHUNK_ELEMENTS // max(1, width))


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(high, (1,), generator=generator, device=_gen_device(generator)).item())


def _uniform(generator: torch.Generator | None) -> float:
    return float(
        torch.rand((1,), generator=generator, device=_gen_device(generator), dtype=torch.float64).item()
    )


def prepare_for_codes(x: Tensor, center: Tensor | None = None, *, eps: float = 1e-12) -> Tensor:
    """Centre users' personal vectors and L2-normalise each row, so codes capture direction only.

    Why: in a calibration run, k-means on the raw personal vectors clustered users by how far their
    vectors had travelled during tuning, i.e. by user activity (r = 0.97 with the number of updates a
    user received), not by what the profile says. Direction-normalised codes were the only ones with
    signal. Centring first removes the offset every user shares (the population drift), which would
    otherwise dominate every direction.

    ``center`` defaults to the mean over the given users; pass the training centre when encoding new users
    so they land in the same space. Rows that are (numerically) zero after centring stay zero instead of
    becoming NaN. Half-precision inputs are returned as fp32.
    """
    x = _check_matrix(x)
    work = x.to(_work_dtype(x))
    if center is None:
        center = work.mean(dim=0) if work.shape[0] > 0 else work.new_zeros(work.shape[1])
    center = center.to(device=work.device, dtype=work.dtype).reshape(-1)
    if center.shape[0] != work.shape[1]:
        raise ValueError(f"center has {center.shape[0]} dims but x has {work.shape[1]}")
    out = work - center
    norms = torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min(eps)
    return out.div_(norms)


def _sqdist_to_point(x: Tensor, p: Tensor, rows: int) -> Tensor:
    """Exact (non-expanded) squared distances: exact duplicates of ``p`` get 0, never a rounding residue."""
    dt = _work_dtype(x)
    p = p.to(dt)
    out = torch.empty(x.shape[0], dtype=dt, device=x.device)
    for s in range(0, x.shape[0], rows):
        out[s : s + rows] = (x[s : s + rows].to(dt) - p).pow_(2).sum(dim=1)
    return out


def kmeans_pp_init(
    x: Tensor, k: int, generator: torch.Generator | None = None, *, chunk_size: int | None = None
) -> Tensor:
    """k-means++ seeding: ``k`` distinct rows of ``x``, each drawn with probability proportional to its
    squared distance from the seeds chosen so far.

    Why this and not random rows: random seeding puts several codes in the same dense region and leaves
    rare profiles without a code, which Lloyd then cannot fix. If ``x`` has fewer distinct vectors than
    ``k`` the remaining seeds are drawn uniformly from the not-yet-chosen rows (still distinct rows), so
    the caller gets ``k`` codes and the duplicates show up as dead codes to reseed rather than an error.
    """
    x = _check_matrix(x)
    n, d = x.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < k:
        raise ValueError(f"k-means++ needs at least k={k} points to pick k distinct seeds, got N={n}")
    rows = _rows_per_chunk(d, chunk_size)
    chosen = [_randint(n, generator)]
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken[chosen[0]] = True
    min_d2 = _sqdist_to_point(x, x[chosen[0]], rows).to(torch.float64)
    for _ in range(1, k):
        w = min_d2.masked_fill(taken, 0.0)
        cdf = torch.cumsum(w, dim=0)
        total = float(cdf[-1].item())
        if total > 0.0 and total != float("inf"):
            # Inverse-CDF sampling on the data's device; only one uniform comes from the generator.
            r = torch.tensor([_uniform(generator) * total], dtype=torch.float64, device=x.device)
            i = int(torch.searchsorted(cdf, r, right=True).item())
            if i >= n or not bool(w[i] > 0):  # rounding at the top end of the CDF
                i = int(torch.nonzero(w > 0).flatten()[-1].item())
        else:
            free = torch.nonzero(~taken).flatten()
            i = int(free[_randint(free.numel(), generator)].item())
        chosen.append(i)
        taken[i] = True
        torch.minimum(min_d2, _sqdist_to_point(x, x[i], rows).to(torch.float64), out=min_d2)
    idx = torch.tensor(chosen, dtype=torch.long, device=x.device)
    return x[idx].to(torch.float32).clone()


def assign(x: Tensor, codebook: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest code per row: ``(idx [N] in 0..K-1, sqdist [N])`` under squared Euclidean distance.

    The argmin uses the fast ``|x|^2 - 2 x.c + |c|^2`` expansion, but the returned distance is recomputed
    exactly against the chosen code, because the expansion cancels badly for near-duplicates and the
    distances drive dead-code reseeding. Ties go to the lowest code index.
    """
    x = _check_matrix(x)
    codebook = _check_matrix(codebook, "codebook")
    n, d = x.shape
    k = codebook.shape[0]
    if codebook.shape[1] != d:
        raise ValueError(f"codebook has {codebook.shape[1]} dims but x has {d}")
    if k == 0:
        raise ValueError("codebook is empty")
    dt = _work_dtype(x)
    c = codebook.to(device=x.device, dtype=dt)
    c_sq = c.pow(2).sum(dim=1)
    rows = _rows_per_chunk(k + d, chunk_size)
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    sqdist = torch.empty(n, dtype=dt, device=x.device)
    for s in range(0, n, rows):
        xc = x[s : s + rows].to(dt)
        scores = torch.addmm(c_sq.unsqueeze(0), xc, c.t(), alpha=-2.0)  # |c|^2 - 2 x.c  (|x|^2 is constant)
        best = scores.argmin(dim=1)
        idx[s : s + rows] = best
        sqdist[s : s + rows] = (xc - c[best]).pow_(2).sum(dim=1)
    return idx, sqdist


def code_sums(x: Tensor, idx: Tensor, k: int, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-code member sums ``[k, D]`` (fp64) and counts ``[k]`` (int64): the M-step's sufficient statistics.

    Kept separate from :func:`update_from_sums` so a data-parallel M-step can ``all_reduce`` both between
    the two calls and every rank lands on the same codebook. fp64 keeps the sums independent of how the
    users were split and ordered (to within fp32 rounding of the final mean). On CUDA the sums use a one-hot
    matmul instead of ``index_add_``, whose float atomics would make reruns differ.
    """
    x = _check_matrix(x)
    if idx.shape != (x.shape[0],):
        raise ValueError(f"idx must have shape ({x.shape[0]},), got {tuple(idx.shape)}")
    n, d = x.shape
    idx = idx.to(device=x.device, dtype=torch.long)
    if n and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise ValueError(f"idx values must be in [0, {k - 1}]")
    counts = torch.bincount(idx, minlength=k)
    if x.device.type == "cpu":
        return _sums_index_add(x, idx, k, chunk_size), counts
    return _sums_onehot(x, idx, k, chunk_size), counts


def _sums_index_add(x: Tensor, idx: Tensor, k: int, chunk_size: int | None) -> Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    rows = _rows_per_chunk(x.shape[1], chunk_size)
    for s in range(0, x.shape[0], rows):
        sums.index_add_(0, idx[s : s + rows], x[s : s + rows].to(torch.float64))
    return sums


def _sums_onehot(x: Tensor, idx: Tensor, k: int, chunk_size: int | None) -> Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    rows = _rows_per_chunk(k + x.shape[1], chunk_size)
    for s in range(0, x.shape[0], rows):
        onehot = torch.nn.functional.one_hot(idx[s : s + rows], k).to(torch.float64)
        sums.addmm_(onehot.t(), x[s : s + rows].to(torch.float64))
    return sums


def update_from_sums(codebook: Tensor, sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form M-step: each code moves to its members' mean; returns ``(new_codebook, dead_mask)``.

    Codes with no members keep their old vector (a mean of nothing is undefined) and are flagged in
    ``dead_mask`` so the caller can reseed them; this keeps the function a pure map from reduced statistics,
    which is what a distributed M-step needs.
    """
    codebook = _check_matrix(codebook, "codebook")
    if sums.shape != codebook.shape or counts.shape != (codebook.shape[0],):
        raise ValueError(
            f"sums {tuple(sums.shape)} / counts {tuple(counts.shape)} do not match codebook "
            f"{tuple(codebook.shape)}"
        )
    counts = counts.to(sums.device)
    dead = counts == 0
    means = sums / counts.clamp_min(1).to(sums.dtype).unsqueeze(1)
    new = torch.where(dead.unsqueeze(1), codebook.to(device=sums.device, dtype=sums.dtype), means)
    return new.to(dtype=codebook.dtype, device=codebook.device), dead.to(codebook.device)


def reseed_dead(
    codebook: Tensor,
    dead_mask: Tensor,
    x: Tensor,
    sqdist: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Move each dead code onto one of the worst-fitted points (largest ``sqdist``); distinct dead codes get
    distinct points. Returns a new codebook.

    Why the worst-fitted points: they are where the current codes explain the data least, so a code placed
    there splits the most overloaded cluster and immediately gains members. The generator only breaks ties
    between equal distances (e.g. many duplicate users), so the choice stays reproducible. If there are
    more dead codes than points, only the first ``N`` dead codes are reseeded.
    """
    codebook = _check_matrix(codebook, "codebook")
    x = _check_matrix(x)
    if dead_mask.shape != (codebook.shape[0],):
        raise ValueError(f"dead_mask must have shape ({codebook.shape[0]},), got {tuple(dead_mask.shape)}")
    if sqdist.shape != (x.shape[0],):
        raise ValueError(f"sqdist must have shape ({x.shape[0]},), got {tuple(sqdist.shape)}")
    dead = torch.nonzero(dead_mask.to(torch.bool)).flatten()
    m = min(dead.numel(), x.shape[0])
    if m == 0:
        return codebook.clone()
    perm = torch.randperm(x.shape[0], generator=generator, device=_gen_device(generator)).to(sqdist.device)
    order = torch.sort(sqdist[perm], descending=True, stable=True).indices[:m]
    picks = perm[order].to(x.device)
    new = codebook.clone()
    new[dead[:m].to(new.device)] = x[picks].to(device=new.device, dtype=new.dtype)
    return new


@dataclass(frozen=True)
class MStepStats:
    """What one M-step saw. ``inertia`` is the mean squared distance under the codebook *before* the
    update (the quantity the step decreases); ``shift`` the largest distance any code moved; ``n_changed``
    how many rows changed code since this codebook's previous M-step (-1 when there is none to compare,
    e.g. the first step), which across EM rounds is the number of users whose profile ID flipped."""

    inertia: float
    perplexity: float
    n_dead: int
    n_reseeded: int
    shift: float
    n_changed: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


class Codebook:
    """One profile's codebook: a ``[K, D]`` fp32 tensor plus the fit / M-step around it.

    Deliberately not an ``nn.Module``: codes are set in closed form, never by gradient, and keeping them out
    of any optimiser's parameter list avoids silently training them. Inputs are expected to have gone
    through :func:`prepare_for_codes` already (the caller owns the centre).
    """

    def __init__(self, k: int, codes: Tensor | None = None) -> None:
        if k < 1:
            raise ValueError(f"codebook size k must be >= 1, got {k}")
        if codes is not None:
            codes = _check_matrix(codes, "codes")
            if codes.shape[0] != k:
                raise ValueError(f"codes has {codes.shape[0]} rows but k={k}")
            codes = codes.detach().to(torch.float32).clone()
        self.k = k
        self.codes: Tensor | None = codes
        self._last_idx: Tensor | None = None

    # -- construction / state ------------------------------------------------------------------------
    @classmethod
    def from_tensor(cls, codes: Tensor) -> Codebook:
        return cls(int(codes.shape[0]), codes)

    def state_dict(self) -> dict[str, Tensor]:
        return {"codes": self._require().detach().cpu().clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> Codebook:
        return cls.from_tensor(state["codes"])

    def to(self, device: torch.device | str) -> Codebook:
        if self.codes is not None:
            self.codes = self.codes.to(device)
        self._last_idx = None
        return self

    @property
    def dim(self) -> int:
        return int(self._require().shape[1])

    def _require(self) -> Tensor:
        if self.codes is None:
            raise RuntimeError("codebook is not initialised: call fit() or build it with from_tensor()")
        return self.codes

    def __repr__(self) -> str:
        shape = None if self.codes is None else tuple(self.codes.shape)
        return f"Codebook(k={self.k}, shape={shape})"

    # -- fitting ---------------------------------------------------------------------------------------
    def fit(self, x: Tensor, iters: int = 25, generator: torch.Generator | None = None,
            restarts: int = 1) -> list[MStepStats]:
        """(Re)initialise with k-means++ and run up to ``iters`` Lloyd steps (each with dead-code reseeding).

        Stops early once an M-step changes no assignment and finds no dead code: the codes are then a
        fixed point and further steps would only burn time. With ``restarts`` > 1, that many k-means++ draws
        are run and the one with the lowest inertia is kept (scikit-learn's ``n_init``): on direction-normalised
        profile vectors single draws stop in local optima that differ in how stably a user keeps a code when
        their history changes (ML-100K default fit, background profile, 3 codes: first-half vs full-history
        kappa 0.46-0.55 over ten draws, the lowest-inertia draws the stable ones). Returns the kept draw's
        per-step stats.
        """
        x = _check_matrix(x)
        if x.shape[0] < self.k:
            raise ValueError(f"fitting k={self.k} codes needs at least {self.k} users, got {x.shape[0]}")
        best: tuple[float, Tensor, list[MStepStats]] | None = None
        for _ in range(max(1, int(restarts))):
            self.codes = kmeans_pp_init(x, self.k, generator).to(x.device)
            self._last_idx = None
            history: list[MStepStats] = []
            for _ in range(iters):
                stats = self.m_step(x, generator)
                history.append(stats)
                if stats.n_changed == 0 and stats.n_dead == 0:
                    break
            if restarts <= 1:
                return history
            inertia = float(assign(x, self.codes)[1].double().sum())
            if best is None or inertia < best[0]:
                best = (inertia, self.codes, history)
        assert best is not None
        self.codes, history = best[1], best[2]
        self._last_idx = None
        return history

    def m_step(self, x: Tensor, generator: torch.Generator | None = None) -> MStepStats:
        """One assign + closed-form update + dead-code reseed on ``x``; updates ``codes`` in place.

        This is the per-EM-round M-step: users' personal vectors moved during the E-step, so the codes
        follow them by one Lloyd step instead of a full refit (which would relabel the IDs every round).
        """
        codes = self._require().to(x.device)
        idx, sqdist = assign(x, codes)
        sums, counts = code_sums(x, idx, self.k)
        new, dead = update_from_sums(codes, sums, counts)
        n_dead = int(dead.sum().item())
        new = reseed_dead(new, dead, x, sqdist, generator) if n_dead else new
        prev = self._last_idx
        comparable = prev is not None and prev.shape == idx.shape and prev.device == idx.device
        n_changed = int((idx != prev).sum().item()) if comparable else -1
        self._last_idx = idx
        stats = MStepStats(
            inertia=float(sqdist.mean().item()) if sqdist.numel() else 0.0,
            perplexity=perplexity(idx, self.k),
            n_dead=n_dead,
            n_reseeded=min(n_dead, x.shape[0]),
            shift=float(torch.linalg.vector_norm(new - codes, dim=1).max().item()),
            n_changed=n_changed,
        )
        self.codes = new
        return stats

    # -- encoding --------------------------------------------------------------------------------------
    def assign(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """0-based nearest code and squared distance per row (see :func:`assign`)."""
        return assign(x, self._require())

    def ids(self, x: Tensor) -> Tensor:
        """1-based profile IDs in ``1..K``: 0 is reserved pipeline-wide for unknown users."""
        return self.assign(x)[0] + 1
