"""userip.quantize: k-means codebooks for profile IDs (fast, CPU-only)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from userip.errors import InputError
from userip.quantize import (
    Codebook,
    assign,
    code_sums,
    codebook_hash,
    dead_codes,
    kmeans_pp_init,
    load_codebooks,
    perplexity,
    prepare_for_codes,
    read_codebook_metadata,
    reseed_dead,
    save_codebooks,
    update_from_sums,
    usage,
)
from userip.seed import torch_generator


def _planted(n_per: int = 40, k: int = 5, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch_generator(seed)
    centers = torch.randn(k, d, generator=g) * 10.0
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centers[labels] + 0.1 * torch.randn(k * n_per, d, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], labels[perm]


def _row_indices(x: torch.Tensor, rows: torch.Tensor) -> list[int]:
    """Index in ``x`` of each row of ``rows`` (rows must be exact copies)."""
    eq = (rows.unsqueeze(1) == x.unsqueeze(0)).all(dim=2)
    assert bool(eq.any(dim=1).all()), "seed is not a data point"
    return [int(i) for i in eq.float().argmax(dim=1)]


# -- k-means++ --------------------------------------------------------------------------------------------
def test_kmeans_pp_picks_k_distinct_points_and_is_deterministic():
    x = torch.randn(200, 8, generator=torch_generator(1))
    a = kmeans_pp_init(x, 16, torch_generator(7))
    b = kmeans_pp_init(x, 16, torch_generator(7))
    c = kmeans_pp_init(x, 16, torch_generator(8))
    assert a.shape == (16, 8) and a.dtype == torch.float32
    assert len(set(_row_indices(x, a))) == 16
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_kmeans_pp_duplicates_and_too_few_points():
    base = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    x = base.repeat(10, 1)  # 30 rows, 3 distinct vectors
    seeds = kmeans_pp_init(x, 5, torch_generator(0))
    assert seeds.shape == (5, 2)
    # the 3 distinct vectors are all covered before any duplicate is used
    assert {tuple(r.tolist()) for r in seeds} == {tuple(r.tolist()) for r in base}
    with pytest.raises(ValueError, match="at least k=4"):
        kmeans_pp_init(torch.randn(3, 2), 4, torch_generator(0))


# -- assign -----------------------------------------------------------------------------------------------
def test_assign_matches_brute_force_and_chunking():
    g = torch_generator(2)
    x, cb = torch.randn(301, 6, generator=g), torch.randn(7, 6, generator=g)
    idx, d2 = assign(x, cb)
    ref = torch.cdist(x.double(), cb.double()).pow(2)
    assert torch.equal(idx, ref.argmin(dim=1))
    torch.testing.assert_close(d2.double(), ref.min(dim=1).values, rtol=1e-5, atol=1e-5)
    idx_c, d2_c = assign(x, cb, chunk_size=17)
    assert torch.equal(idx, idx_c) and torch.equal(d2, d2_c)


# -- Lloyd / Codebook -------------------------------------------------------------------------------------
def test_lloyd_recovers_planted_clusters():
    x, labels = _planted()
    cb = Codebook(5)
    history = cb.fit(x, iters=20, generator=torch_generator(3))
    assert history and history[-1].n_dead == 0
    ids = cb.ids(x)
    contingency = torch.zeros(5, 5, dtype=torch.long)
    contingency.index_put_((labels, ids - 1), torch.ones_like(labels), accumulate=True)
    # a perfect matching: every planted cluster maps to exactly one code and vice versa
    assert torch.equal((contingency > 0).sum(dim=1), torch.ones(5, dtype=torch.long))
    assert torch.equal((contingency > 0).sum(dim=0), torch.ones(5, dtype=torch.long))


def test_fit_is_deterministic_under_seed():
    x, _ = _planted(n_per=20, k=4, d=8, seed=5)
    a, b = Codebook(6), Codebook(6)
    a.fit(x, iters=5, generator=torch_generator(11))
    b.fit(x, iters=5, generator=torch_generator(11))
    assert torch.equal(a.state_dict()["codes"], b.state_dict()["codes"])


def test_ids_are_one_based():
    x = torch.randn(100, 4, generator=torch_generator(4))
    cb = Codebook(8)
    cb.fit(x, iters=3, generator=torch_generator(0))
    ids = cb.ids(x)
    assert ids.dtype == torch.long
    assert int(ids.min()) >= 1 and int(ids.max()) <= 8
    assert torch.equal(ids, cb.assign(x)[0] + 1)


def test_codebook_state_round_trip_and_errors():
    codes = torch.randn(3, 4, dtype=torch.float64)
    cb = Codebook.from_tensor(codes)
    assert cb.k == 3 and cb.dim == 4 and cb.codes is not None and cb.codes.dtype == torch.float32
    again = Codebook.from_state_dict(cb.state_dict())
    assert torch.equal(again.codes, cb.codes)
    with pytest.raises(RuntimeError, match="not initialised"):
        Codebook(3).ids(torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least 5 users"):
        Codebook(5).fit(torch.randn(4, 2), iters=1)


# -- closed-form M-step -----------------------------------------------------------------------------------
def test_update_from_sums_is_members_mean():
    g = torch_generator(6)
    x, cb = torch.randn(50, 3, generator=g), torch.randn(4, 3, generator=g)
    idx, _ = assign(x, cb)
    sums, counts = code_sums(x, idx, 4)
    new, dead = update_from_sums(cb, sums, counts)
    for j in range(4):
        members = x[idx == j]
        assert int(counts[j]) == members.shape[0]
        if members.shape[0]:
            torch.testing.assert_close(new[j], members.mean(dim=0))
            assert not bool(dead[j])
        else:
            assert bool(dead[j]) and torch.equal(new[j], cb[j])


def test_code_sums_accelerator_path_matches_cpu_path():
    """The one-hot matmul used on CUDA (deterministic, no float atomics) gives the same sums as index_add_."""
    from userip.quantize.kmeans import _sums_index_add, _sums_onehot

    g = torch_generator(15)
    x = torch.randn(123, 7, generator=g)
    idx = torch.randint(5, (123,), generator=g)
    torch.testing.assert_close(_sums_onehot(x, idx, 5, 10), _sums_index_add(x, idx, 5, None))


def test_update_from_sums_on_split_data_equals_full():
    """Distributed invariant: all_reduce(sums), all_reduce(counts), then update == single-process update."""
    g = torch_generator(9)
    x, cb = torch.randn(97, 5, generator=g), torch.randn(6, 5, generator=g)
    cb[5] = 100.0  # a dead code, so the dead mask is covered too
    idx, _ = assign(x, cb)
    full = update_from_sums(cb, *code_sums(x, idx, 6))
    s1, c1 = code_sums(x[:40], idx[:40], 6)
    s2, c2 = code_sums(x[40:], idx[40:], 6)
    split = update_from_sums(cb, s1 + s2, c1 + c2)
    torch.testing.assert_close(split[0], full[0], rtol=0, atol=1e-6)
    assert torch.equal(split[1], full[1]) and bool(full[1][5])


# -- dead codes -------------------------------------------------------------------------------------------
def test_m_step_reseeds_far_code_onto_worst_fitted_point():
    x, _ = _planted(n_per=30, k=3, d=4, seed=12)
    init = kmeans_pp_init(x, 3, torch_generator(0))
    codes = torch.cat([init, torch.full((1, 4), 1e4)])  # code 3 is far from every user
    cb = Codebook.from_tensor(codes)
    _, sqdist = assign(x, codes)
    worst = x[int(sqdist.argmax())]
    stats = cb.m_step(x, torch_generator(0))
    assert stats.n_dead == 1 and stats.n_reseeded == 1
    assert cb.codes is not None and torch.equal(cb.codes[3], worst)
    assert int(usage(cb.assign(x)[0], 4)[3]) >= 1


def test_reseed_dead_uses_distinct_worst_points():
    x = torch.tensor([[0.0], [1.0], [5.0], [9.0], [2.0]])
    sqdist = torch.tensor([0.0, 1.0, 25.0, 81.0, 4.0])
    cb = torch.zeros(4, 1)
    dead = torch.tensor([False, True, False, True])
    new = reseed_dead(cb, dead, x, sqdist, torch_generator(0))
    assert new[1].item() == 9.0 and new[3].item() == 5.0
    assert new[0].item() == 0.0 and new[2].item() == 0.0


# -- metrics ----------------------------------------------------------------------------------------------
def test_perplexity_usage_dead_codes():
    uniform = torch.arange(8).repeat(5)
    collapsed = torch.full((40,), 3)
    assert perplexity(uniform, 8) == pytest.approx(8.0)
    assert perplexity(collapsed, 8) == pytest.approx(1.0)
    assert math.isnan(perplexity(torch.empty(0, dtype=torch.long), 8))
    assert usage(collapsed, 8).tolist() == [0, 0, 0, 40, 0, 0, 0, 0]
    assert dead_codes(collapsed, 8).tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert dead_codes(uniform, 8).numel() == 0


# -- prepare_for_codes ------------------------------------------------------------------------------------
def test_prepare_for_codes_unit_norm_and_removes_shared_offset():
    g = torch_generator(13)
    offset, v, w = torch.randn(3, 6, generator=g)
    # mean of these rows is exactly `offset`; rows 0 and 1 differ only in magnitude along v
    x = torch.stack([offset + v, offset + 3 * v, offset - 2 * v + w, offset - 2 * v - w])
    out = prepare_for_codes(x)
    torch.testing.assert_close(torch.linalg.vector_norm(out, dim=1), torch.ones(4))
    torch.testing.assert_close(out[0], out[1])
    # an explicit centre (the training one) gives the same result as the batch mean here
    torch.testing.assert_close(prepare_for_codes(x, center=offset), out, atol=1e-6, rtol=0)
    # a zero row after centring stays finite
    z = prepare_for_codes(torch.ones(3, 4))
    assert torch.isfinite(z).all() and torch.equal(z, torch.zeros(3, 4))
    assert prepare_for_codes(x.half()).dtype == torch.float32


# -- save / load ------------------------------------------------------------------------------------------
def test_save_load_round_trip_and_stable_hash(tmp_path):
    g = torch_generator(14)
    books = {"hobby": torch.randn(4, 6, generator=g), "background": torch.randn(8, 6, generator=g)}
    meta = {f"key{i}": f"value{i}" for i in range(12)}
    p1, p2 = tmp_path / "a" / "codebooks.safetensors", tmp_path / "b.safetensors"
    save_codebooks(p1, books, meta)
    # same content, different insertion order of both dicts: byte-identical file
    save_codebooks(p2, dict(reversed(books.items())), dict(reversed(meta.items())))
    loaded = load_codebooks(p1)
    assert set(loaded) == {"hobby", "background"}
    for name, t in books.items():
        assert torch.equal(loaded[name], t) and loaded[name].dtype == torch.float32
    assert read_codebook_metadata(p1) == meta
    assert set(load_file(str(p1))) == {"codebook.hobby", "codebook.background"}  # plain safetensors reader
    h = codebook_hash(p1)
    assert len(h) == 64 and h == codebook_hash(p1) == codebook_hash(p2)
    save_codebooks(p1, books, meta)
    assert codebook_hash(p1) == h
    assert sorted(q.name for q in p1.parent.iterdir()) == ["codebooks.safetensors"]  # no temp files left
    books["hobby"] = books["hobby"] + 1
    save_codebooks(p2, books, meta)
    assert codebook_hash(p2) != h


def test_save_load_errors(tmp_path):
    with pytest.raises(ValueError, match="K, D"):
        save_codebooks(tmp_path / "x.safetensors", {"hobby": torch.zeros(3)})
    with pytest.raises(ValueError, match="NaN"):
        save_codebooks(tmp_path / "x.safetensors", {"hobby": torch.full((2, 2), float("nan"))})
    with pytest.raises(InputError, match="not found"):
        load_codebooks(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError):
        load_codebooks(bad)


def test_restarts_keep_the_lowest_inertia_draw_reproducibly():
    g = torch_generator(0)
    x = prepare_for_codes(torch.randn(300, 8, generator=g))  # no planted structure: draws disagree

    def inertia(cb: Codebook) -> float:
        return float(assign(x, cb.codes)[1].double().sum())

    one, many, again = Codebook(3), Codebook(3), Codebook(3)
    one.fit(x, iters=100, generator=torch_generator(1))
    many.fit(x, iters=100, generator=torch_generator(1), restarts=8)
    again.fit(x, iters=100, generator=torch_generator(1), restarts=8)
    # the first of the eight draws is the single run's draw, so the kept one is never worse
    assert inertia(many) <= inertia(one) + 1e-9
    assert torch.equal(many.codes, again.codes)
    singles = []
    g = torch_generator(1)
    for _ in range(8):
        cb = Codebook(3)
        cb.fit(x, iters=100, generator=g)
        singles.append(inertia(cb))
    assert inertia(many) == pytest.approx(min(singles), rel=1e-6)
    # converged: more Lloyd steps move no user
    many.m_step(x)
    assert many.m_step(x).n_changed == 0
