"""Refits that keep IDs meaningful: Hungarian relabelling of a new codebook to a previous fit's IDs."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_amortised import cfg as amortised_cfg
from test_amortised import planted
from userip.llm import tiny_llm
from userip.profile import fit_profiles
from userip.profile.amortised import AmortisedFitter
from userip.profile.pooled import PooledStates
from userip.profile.refit import align_to_previous
from userip.quantize import (
    apply_relabel,
    assign,
    contingency,
    match_codes,
    prepare_for_codes,
    read_codebook_metadata,
    save_codebooks,
)
from userip.quantize.align import MIN_SHARED_PER_CODE


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("USERIP_CACHE_DIR", str(tmp_path / "cache"))


# ------------------------------------------------------------------ the matching itself
def test_a_known_permutation_is_exactly_undone():
    rng = np.random.default_rng(0)
    old = rng.integers(1, 5, 200)
    perm = np.array([3, 1, 4, 2])  # old ID j -> raw new label perm[j-1]
    new = perm[old - 1]
    m = match_codes(old, new, 4, 4)
    assert m.method == "users" and m.shared == 200
    assert m.changed == 0 and m.changed_raw == int((new != old).sum()) > 0 and m.agreement == 1.0
    # relabel maps raw new label i+1 back to the old ID
    assert [m.relabel[perm[j] - 1] for j in range(4)] == [1, 2, 3, 4]
    codes = torch.randn(4, 6)
    permuted = codes[torch.as_tensor(np.argsort(perm))]  # row perm[j]-1 of the new codebook is old code j
    fixed, ids = apply_relabel(permuted, torch.as_tensor(new), m.relabel)
    assert torch.equal(fixed, codes)
    assert ids.tolist() == old.tolist()
    # the relabelled codebook assigns exactly the relabelled IDs (inference stays consistent with the bank)
    x = torch.randn(50, 6)
    raw = assign(x, permuted)[0] + 1
    assert torch.equal(apply_relabel(permuted, raw, m.relabel)[1], assign(x, fixed)[0] + 1)


def test_noisy_contingency_keeps_the_most_users_and_unknown_users_stay_zero():
    rng = np.random.default_rng(1)
    old = rng.integers(1, 4, 300)
    new = np.array([2, 3, 1])[old - 1]
    flip = rng.random(300) < 0.2
    new[flip] = rng.integers(1, 4, int(flip.sum()))
    old[:10] = 0  # users new in this fit
    m = match_codes(old, new, 3, 3)
    c = contingency(old, new, 3, 3)
    best = max(sum(c[i, p[i]] for i in range(3)) for p in
               [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
    assert m.shared == 290 and m.shared - m.changed == best  # Hungarian = brute force
    _, ids = apply_relabel(torch.zeros(3, 2), torch.tensor([0, 1, 2, 3]), m.relabel)
    assert ids[0] == 0


def test_codeword_fallback_and_codebook_size_changes():
    codes = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    order = torch.tensor([2, 0, 3, 1])
    # too few shared users: the codewords decide (the new codebook is the old one with rows permuted)
    assert MIN_SHARED_PER_CODE * 4 > 1
    m = match_codes(np.array([1]), np.array([1]), 4, 4, old_codes=codes, new_codes=codes[order])
    assert m.method == "codewords" and m.relabel == (order + 1).tolist()
    assert min(m.codeword_cosine) > 0.999
    assert match_codes(np.array([1]), np.array([1]), 4, 4).method == "identity"
    # a larger new codebook: matched codes keep their IDs, the extra code takes the free ID
    old = np.repeat([1, 2], 20)
    m = match_codes(old, np.repeat([3, 1], 20), 2, 3)
    assert m.relabel == [2, 3, 1] and m.changed == 0
    # a smaller one: only IDs <= k_new can survive
    m = match_codes(np.repeat([1, 2, 3], 20), np.repeat([2, 1, 1], 20), 3, 2)
    assert sorted(m.relabel) == [1, 2] and m.changed == 20


# ------------------------------------------------------------------ on the planted fixture
def _write_previous(d, f, model="tiny-random-llama"):
    d.mkdir(parents=True)
    users = f.all_users.numpy()
    z = f.assignments()
    ids = pd.DataFrame({"user_id": [str(u) for u in users], "user_idx": users})
    for k, p in enumerate(f.cfg.profiles):
        ids[p.name] = z[f.all_users, k].numpy()
    ids.to_parquet(d / "profile_ids.parquet", index=False)
    save_codebooks(d / "codebooks.safetensors", {k: v.detach() for k, v in f.state.codebooks.items()})
    (d / "config.yaml").write_text(yaml.safe_dump({
        "model": model, "hidden_size": f.profiles.hidden,
        "profiles": [{"name": p.name, "n_tokens": p.n_tokens, "codebook_size": p.codebook_size}
                     for p in f.cfg.profiles]}))
    return ids


def test_refit_from_another_seed_keeps_the_planted_groups_ids(tmp_path):
    llm = tiny_llm(seed=0)
    corpus = planted(llm.tokenizer, n_users=32)
    conf = amortised_cfg(epochs=2, profiles=[{"name": "hobby", "codebook_size": 2},
                                             {"name": "background", "codebook_size": 3}])
    states = PooledStates(llm, cache=tmp_path / "c.safetensors")
    first = AmortisedFitter(llm, conf, corpus, None, states=states)
    first.fit(progress=False)
    old = _write_previous(tmp_path / "old", first)

    agree_raw, agree_aligned = {}, {}
    seeds = (3, 4, 5, 6)  # refits from other seeds: k-means labels come out in another order for some of them
    for seed in seeds:
        f = AmortisedFitter(llm, conf.replace(seed=seed), corpus, None, states=states)
        f.fit(progress=False)
        raw = f.assignments().clone()
        codes_before = {k: v.detach().clone() for k, v in f.state.codebooks.items()}
        report = align_to_previous(f, tmp_path / "old", [str(u) for u in f.all_users.tolist()],
                                   "tiny-random-llama")
        after = f.assignments()
        for k, p in enumerate(conf.profiles):
            r = report["profiles"][p.name]
            o = old[p.name].to_numpy()
            n_raw, n_new = raw[f.all_users, k].numpy(), after[f.all_users, k].numpy()
            assert r["method"] == "users" and r["shared"] == 32
            assert r["changed"] == int((n_new != o).sum()) and r["changed_raw"] == int((n_raw != o).sum())
            agree_raw[seed, p.name], agree_aligned[seed, p.name] = (n_raw == o).mean(), (n_new == o).mean()
            # only labels moved: the same users share a code, and the codebook rows are the old ones permuted
            assert len(set(zip(n_raw, n_new, strict=True))) == len(set(n_raw))
            assert sorted(map(tuple, f.state.codebooks[p.name].tolist())) == \
                sorted(map(tuple, codes_before[p.name].tolist()))
            # nearest-code assignment under the relabelled codebook gives the relabelled IDs
            X, _, _ = f._personal_flat(k)
            assert torch.equal(assign(X, f.state.codebooks[p.name])[0] + 1, after[f.users, k])
    assert all(agree_aligned[key] >= agree_raw[key] for key in agree_raw), (agree_raw, agree_aligned)
    # some refit found the planted groups of the 2-code profile under swapped labels: relabelled, most users
    # keep their ID; and some refit permuted the 3-code profile's labels too
    assert any(agree_raw[s, "hobby"] < 0.5 < 0.6 <= agree_aligned[s, "hobby"] for s in seeds), (agree_raw,
                                                                                               agree_aligned)
    assert any(agree_aligned[s, "background"] > agree_raw[s, "background"] + 0.2 for s in seeds), (agree_raw,
                                                                                                  agree_aligned)
    print("agreement with the old IDs, raw -> aligned:",
          {f"{s}/{n}": f"{agree_raw[s, n]:.2f}->{agree_aligned[s, n]:.2f}" for s, n in agree_raw})


def test_fit_profiles_with_previous_writes_a_consistent_refit(prepared, tmp_path):
    from userip.bank import read_profiles_dir

    fast = dict(epochs=1, batch_users=4, inner_steps=1, max_tokens=32, windows_per_user=2)
    fit_profiles(prepared.path, tmp_path / "a", llm=tiny_llm(), progress=False, seed=3, **fast)
    m = fit_profiles(prepared.path, tmp_path / "b", llm=tiny_llm(), progress=False, seed=5,
                     previous=tmp_path / "a", **fast)
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["refit"] == json.loads(json.dumps(m["refit"]))
    a = pd.read_parquet(tmp_path / "a" / "profile_ids.parquet")
    b = pd.read_parquet(tmp_path / "b" / "profile_ids.parquet")
    for name in ("hobby", "background"):
        r = saved["refit"]["profiles"][name]
        assert r["changed"] == int((a[name].to_numpy() != b[name].to_numpy()).sum()) <= r["changed_raw"]
        assert sum(saved["final"]["codes"][name]["usage"]) == len(b)
        assert saved["final"]["codes"][name]["usage"] == \
            [int((b[name] == i).sum()) for i in range(1, len(saved["final"]["codes"][name]["usage"]) + 1)]
    # the written codebooks assign the written IDs
    t = load_file(tmp_path / "b" / "profiles.safetensors")
    cb = load_file(tmp_path / "b" / "codebooks.safetensors")
    for k, name in enumerate(("hobby", "background")):
        P = t["personal"][torch.as_tensor(b["user_idx"].to_numpy().copy()), k, :1].flatten(1)
        X = prepare_for_codes(P, center=t["code_center"][k, :1].flatten())
        assert (assign(X, cb[f"codebook.{name}"])[0] + 1).tolist() == b[name].tolist()
    # lineage: the codebooks and the bank record which codebooks this refit kept the IDs of
    prev_hash = saved["refit"]["previous_codebook_hash"]
    assert read_codebook_metadata(tmp_path / "b" / "codebooks.safetensors")["previous_codebook_hash"] == prev_hash
    _, meta = read_profiles_dir(tmp_path / "b")
    assert meta["codebook_previous_hash"] == prev_hash != meta["codebook_hash"]
    assert "codebook_previous_hash" not in read_profiles_dir(tmp_path / "a")[1]


def test_summary_table_reports_changed_ids():
    from rich.console import Console

    from userip.profile.report import summary_table

    refit = {"previous": "P0", "profiles": {
        "hobby": {"method": "users", "shared": 40, "changed": 3, "changed_raw": 37, "agreement": 0.925},
        "extra": {"method": "none", "reason": "profile not in the previous fit"}}}
    con = Console(record=True, width=200)
    con.print(summary_table({"epochs": [], "final": {}, "refit": refit}))
    text = con.export_text()
    assert "refit of P0" in text and "37" in text and "92%" in text and "not in the previous fit" in text
