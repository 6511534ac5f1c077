"""Hybrid inference (issue 10, item 4): the amortised map, then per-user E-steps under a prior centred on its output."""

import json

import pandas as pd
import pytest
import torch

from helpers import planted_corpus
from userip.errors import UseripError
from userip.llm import tiny_llm
from userip.profile import ProfileConfig, ProfileFitter, fit_profiles, infer_profiles
from userip.profile.hybrid import HybridFitter
from userip.profile.pooled import PooledStates
from userip.profile.template import make_batch

FAST = dict(inference="hybrid", epochs=3, hybrid_map_epochs=2, batch_users=4, inner_steps=2, max_tokens=32,
            windows_per_user=2, rank=4, patience=10, bootstrap=100)


pytestmark = pytest.mark.usefixtures("data_cache")  # the ceiling and pooled-state caches live in tmp_path


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(seed=0)


def cfg(**kw):
    base = dict(profiles=[{"name": "hobby", "codebook_size": 2}, {"name": "background", "codebook_size": 2}],
                inference="hybrid", batch_users=8, epochs=3, hybrid_map_epochs=2, max_tokens=64, rank=4,
                lr_map=0.05, lr_shared=0.05, lr_user=0.1, inner_steps=3, patience=10, bootstrap=100)
    base.update(kw)
    return ProfileConfig(**base)


def test_hybrid_fit_writes_the_contract_and_counts_each_phases_tokens(prepared, tmp_path):
    out = tmp_path / "profiles"
    metrics = fit_profiles(prepared.path, out, llm=tiny_llm(), progress=False, **FAST)
    for f in ("profiles.safetensors", "codebooks.safetensors", "profile_ids.parquet", "config.yaml",
              "metrics.json", "checkpoints/last.json"):
        assert (out / f).exists(), f
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["inference"] == "hybrid"
    assert [m["hybrid"]["phase"] for m in saved["epochs"]] == ["amortised", "amortised", "e_step"]
    c = saved["compute"]
    by = c["train_tokens_by_phase"]
    assert by["amortised"] > 0 and by["e_step"] > 0 and c["train_tokens"] == by["amortised"] + by["e_step"]
    assert c["pool_tokens"] > 0
    # cumulative per epoch: the map's tokens stop growing in phase 2, the E-step's start there
    per = [m["compute"]["train_tokens_by_phase"] for m in saved["epochs"]]
    assert per[0]["e_step"] == per[1]["e_step"] == 0 < per[0]["amortised"] < per[1]["amortised"]
    assert per[2] == by and per[2]["amortised"] == per[1]["amortised"]
    assert saved["compute"] == json.loads(json.dumps(metrics["compute"]))
    # new users get the amortised output: one no-grad pass, no gradient step
    ids = pd.read_parquet(out / "profile_ids.parquet")
    users = ids["user_id"].astype(str).tolist()[:3]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: pytest.fail("no autograd graph"), lambda t: t):
        new = infer_profiles(out, prepared, users, llm=tiny_llm(), progress=False)
    assert new["hobby"].between(1, 4).all() and new["background"].between(1, 3).all()


def test_em_and_amortised_count_their_training_tokens_too(prepared, tmp_path, llm):
    for inference in ("em", "amortised"):
        m = fit_profiles(prepared.path, tmp_path / inference, llm=llm, progress=False,
                         **{**FAST, "inference": inference, "epochs": 1})
        assert list(m["compute"]["train_tokens_by_phase"]) == [inference]
        assert m["compute"]["train_tokens"] > 0
        assert (m["compute"]["pool_tokens"] > 0) == (inference == "amortised")
    # one E-step update: each row's prompt (template + soft tokens) and its behaviour tokens, once
    corpus = planted_corpus(llm.tokenizer, n_users=4)
    f = ProfileFitter(llm, cfg(inference="em"), corpus)
    rows = [corpus.train[u][0] for u in range(1, 5)]
    f.train_step(torch.arange(1, 5), rows, update_shared=True)
    prefix = f.scorer.layout.prefix_len
    assert f.train_tokens == {"em": 4 * prefix + int(make_batch(rows).lengths.sum())}


def test_phase_two_starts_at_the_amortised_output_and_the_prior_holds_it_there(llm, tmp_path):
    corpus = planted_corpus(llm.tokenizer, n_users=16)
    states = PooledStates(llm, cache=tmp_path / "c.safetensors")
    fits = {}
    for prior in (5.0, 0.0):
        # published at x1: the end state is then what phase 2 left (a chosen scale moves the prompt and the map)
        f = HybridFitter(llm, cfg(hybrid_prior=prior, apply_scale=False), corpus, None, states=states)
        seen = {}
        orig = f.e_step_epoch

        def spy(*a, f=f, seen=seen, orig=orig, **k):
            if not seen:  # the table as phase 2 finds it, before its first update
                seen.update(table=f.profiles.table.clone(), shared=f.profiles.shared.clone(),
                            maps=[p.detach().clone() for p in f.maps.parameters()])
            return orig(*a, **k)

        f.e_step_epoch = spy
        st = f.fit(progress=False)
        fits[prior] = (f, st, seen)
    f, st, seen = fits[5.0]
    users = f.users
    with torch.no_grad():
        amortised = f.personal(f.features(users.tolist()), f.fold[users])
    # before phase 2: every user's residual is exactly the map's output, which is the prior's centre
    assert torch.equal(seen["table"][f.rows(users)], amortised)
    assert torch.equal(f.anchor, seen["table"])
    # phase 2 moved the residuals, with the shared prompt and the map frozen
    assert [m["hybrid"]["phase"] for m in st.metrics] == ["amortised", "amortised", "e_step"]
    assert [m["hybrid"]["drift"] for m in st.metrics][:2] == [0.0, 0.0]
    on = st.metrics[-1]["hybrid"]["drift"]
    assert on > 0
    assert torch.equal(f.profiles.shared, seen["shared"])
    assert all(torch.equal(a, b) for a, b in zip(seen["maps"], f.maps.parameters(), strict=True))
    # the prior keeps them closer to the amortised output than the same refinement without it
    g, st_off, _ = fits[0.0]
    assert torch.equal(g.anchor, f.anchor), "phase 1 does not depend on the prior"
    off = st_off.metrics[-1]["hybrid"]["drift"]
    assert on < 0.5 * off, (on, off)


def test_a_killed_hybrid_fit_resumes_in_either_phase_to_the_same_ids(llm, tmp_path):
    corpus = planted_corpus(llm.tokenizer, n_users=12)
    states = PooledStates(llm, cache=tmp_path / "c.safetensors")
    c = cfg(epochs=4)
    full = HybridFitter(llm, c, corpus, tmp_path / "a", states=states)
    full.fit(progress=False)
    HybridFitter(llm, c, corpus, tmp_path / "b", states=states).fit(epochs=1, progress=False)  # killed in phase 1
    HybridFitter(llm, c, corpus, tmp_path / "b", states=states).fit(epochs=3, progress=False)  # killed in phase 2
    from safetensors.torch import load_file

    ck = load_file(tmp_path / "b" / "checkpoints" / "epoch0003.rank0-of-1.safetensors")
    assert "hybrid.anchor" in ck and int(ck["hybrid.phase"][0]) == 1
    resumed = HybridFitter(llm, c, corpus, tmp_path / "b", states=states)
    st = resumed.fit(progress=False)
    assert [m["epoch"] for m in st.metrics] == [1, 2, 3, 4]
    assert torch.equal(full.anchor, resumed.anchor)
    assert torch.equal(full.assignments(), resumed.assignments())
    assert torch.allclose(full.theta_table()[0], resumed.theta_table()[0])
    assert st.metrics[-1]["compute"] == full.state.metrics[-1]["compute"]


@pytest.mark.parametrize("change, key", [
    (dict(hybrid_prior=-1.0), "config.hybrid_prior"),
    (dict(hybrid_map_epochs=3, epochs=3), "config.hybrid_map_epochs"),
    (dict(hybrid_map_epochs=0), "config.hybrid_map_epochs"),
    (dict(table="plain"), "config.inference"),
    (dict(inference="hybird"), "config.inference"),
])
def test_bad_hybrid_config_names_the_key(change, key):
    with pytest.raises(UseripError, match=key):
        cfg(**change)
