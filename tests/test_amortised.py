"""Amortised inference, the in-context ceiling, bootstrap intervals and rated behaviour text."""

import numpy as np
import pytest
import torch

from userip.llm import tiny_llm
from userip.profile import Corpus, ProfileConfig
from userip.profile import evaluate as ev
from userip.profile.amortised import AmortisedFitter
from userip.profile.corpus import encode_context, rating_marks
from userip.profile.pooled import PooledStates, pool_windows

A = ["Toy Story: 5", "Jumanji: 4", "children comedy: 5", "love music: 4"]
B = ["Heat: 2", "Casino: 1", "crime thriller: 2", "war western: 1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """The ceiling and pooled-state caches of these tests live in tmp_path, never in the user's cache."""
    monkeypatch.setenv("USERIP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(seed=0)


def planted(tok, n_users=32, seed=0, context=True):
    """Two groups with disjoint items and ratings: the history says which group a user is in."""
    rng = np.random.default_rng(seed)
    train, held, ctx = {}, {}, {}
    for u in range(1, n_users + 1):
        vocab = A if u % 2 else B
        train[u] = ["; ".join(rng.choice(vocab, 5)) for _ in range(3)]
        held[u] = ["; ".join(rng.choice(vocab, 5))]
        ctx[u] = "; ".join(rng.choice(vocab, 6))
    act = np.zeros(n_users + 1, dtype=np.int64)
    act[1:] = rng.integers(5, 50, n_users)
    return Corpus.from_text(tok, train, held, n_users, act, 64, context=ctx if context else None,
                            lead_in="The user watched:", rated=True)


def cfg(**kw):
    base = dict(profiles=[{"name": "hobby", "codebook_size": 2}, {"name": "background", "codebook_size": 2}],
                inference="amortised", batch_users=8, epochs=4, max_tokens=64, rank=4, lr_map=0.05,
                lr_shared=0.05, patience=10, bootstrap=200)
    base.update(kw)
    return ProfileConfig(**base)


def test_amortised_fit_learns_personal_profiles_that_follow_the_planted_groups(llm, tmp_path):
    from sklearn.metrics import adjusted_rand_score

    corpus = planted(llm.tokenizer)
    f = AmortisedFitter(llm, cfg(), corpus, None, states=PooledStates(llm, cache=tmp_path / "c.safetensors"))
    assert float(f.map.A[0].detach().abs().sum()) == 0.0  # starts at the population prompt
    st = f.fit(progress=False)
    last = st.final
    assert "shuffled" not in st.metrics[0]["heldout"]  # per epoch: the selection half, own/mean/scaled only
    train = [m["train_nll"] for m in st.metrics]
    assert train[-1] < train[0], train
    assert float(f.map.A[0].detach().abs().sum()) > 0
    # own beats the population prompt and another user's profile on held-out windows
    assert last["heldout"]["own"] < last["heldout"]["mean"]
    assert last["heldout"]["own"] < last["heldout"]["shuffled"]
    groups = np.array([u % 2 for u in range(1, 33)])
    z = f.assignments()[1:].numpy()
    assert max(adjusted_rand_score(groups, z[:, k]) for k in range(2)) > 0.6
    # report half, intervals, ceiling and the captured fraction are all there
    gaps = last["report"]["gaps"]
    assert {"own_vs_mean", "own_vs_shuffled", "codeword_vs_mean", "calibrated_vs_mean"} <= set(gaps)
    assert gaps["own_vs_mean"]["lo"] <= gaps["own_vs_mean"]["token"] <= gaps["own_vs_mean"]["hi"]
    assert last["select"]["users"] + last["report"]["users"] == last["eval_users"]
    assert "rating_token" in gaps["own_vs_mean"] and "item" in gaps["own_vs_mean"]
    assert f.ceiling_metrics["personal_gain"] is not None
    assert "captured" in last and last["personal_scale"] in (1.0, *cfg().eval_scales)
    # the published profile is the scale the selection half chose at the best epoch
    best = st.metrics[st.best_epoch - 1]["select"]["heldout"]
    assert last["applied_scale"] == ev.pick_scale(best, cfg().eval_scales)


def test_the_published_scale_is_the_chosen_variant_and_keeps_every_id(llm, tmp_path):
    corpus = planted(llm.tokenizer, n_users=16)
    f = AmortisedFitter(llm, cfg(epochs=2, cross_fit=2, apply_scale=False), corpus, None,
                        states=PooledStates(llm, cache=tmp_path / "c.safetensors"))
    st = f.fit(progress=False)
    assert st.final["applied_scale"] == 1.0
    users = f.eval_users
    before = f.eval_variants(users)
    z = f.assignments()
    f.apply_personal_scale(0.5)
    after = f.eval_variants(users)
    torch.testing.assert_close(after["own"], before["own_x0.5"])  # exactly the variant that was chosen
    torch.testing.assert_close(after["mean"], before["mean"])  # the population prompt does not move
    assert not torch.allclose(after["own"], before["own"])
    # the map was scaled too: reading the histories again gives the published profiles and the same IDs
    f.materialise(f.users)
    theta, _ = f.theta_table()
    torch.testing.assert_close(theta[users], after["own"])
    f.fitted_fold = f.fold.clone()
    assert torch.equal(f.infer(f.users, fitted_rows=f.users), z[f.users])


def test_loo_and_forecast_features_never_read_the_target_window(llm, tmp_path):
    corpus = planted(llm.tokenizer, n_users=8)
    states = PooledStates(llm, cache=tmp_path / "c.safetensors")
    for target in ("loo", "forecast"):
        f = AmortisedFitter(llm, cfg(target=target), corpus, None, states=states)
        u = 3
        z = f.features([u], [2])
        st = f.states[u]
        read = st[:2].mean(0) if target == "forecast" else st[[0, 1]].mean(0)
        assert torch.allclose(z[0], f.standardise(read), atol=1e-6)
        changed = dict(f.states)
        changed[u] = st.clone()
        changed[u][2] += 100.0  # the target window's state must not matter
        f.states, f.sums = changed, {k: v.sum(0) for k, v in changed.items()}
        assert torch.allclose(f.features([u], [2]), z, atol=1e-5)


def test_pooled_states_are_cached_by_content_and_match_a_fresh_pass(llm, tmp_path):
    corpus = planted(llm.tokenizer, n_users=6)
    path = tmp_path / "pooled.safetensors"
    first = PooledStates(llm, cache=path).get(corpus.train)
    assert path.exists()
    again = PooledStates(llm, cache=path)
    calls = []
    import userip.profile.pooled as pooled

    orig = pooled.pool_windows
    pooled.pool_windows = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        second = again.get(corpus.train)
        assert not calls, "unchanged users must come from the cache"
        changed = {**corpus.train, 1: corpus.train[1][:2]}  # user 1's content changed: recomputed
        third = again.get(changed)
        assert calls
    finally:
        pooled.pool_windows = orig
    for u in corpus.train:
        assert torch.equal(first[u], second[u])
    assert torch.allclose(third[1], first[1][:2], atol=1e-5)
    # a window's mean-pooled state does not depend on what else is in its batch
    alone = pool_windows(llm, corpus.train[3][:1])
    assert torch.allclose(alone[0], first[3][0], atol=1e-5)


def test_a_middle_layer_is_pooled_without_running_the_blocks_after_it(llm):
    from userip.errors import UseripError
    from userip.profile.pooled import model_key

    window = planted(llm.tokenizer, n_users=2).train[1][0]
    ids = torch.tensor([[llm.tokenizer.bos_token_id, *window]])
    backbone = llm.model.model
    with torch.no_grad():
        hidden = backbone(input_ids=ids, output_hidden_states=True).hidden_states
    depth = len(backbone.layers)
    assert depth >= 2
    attn = llm.model.config._attn_implementation
    ran = []
    hooks = [b.register_forward_hook(lambda *a, i=i: ran.append(i)) for i, b in enumerate(backbone.layers)]
    try:
        got = pool_windows(llm, [window], layer=1)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0], "the blocks after the pooled one must not run"
    want = backbone.norm(hidden[1])[0, 1:].float().mean(0)  # block 1's output through the final norm, BOS left out
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)
    assert len(backbone.layers) == depth  # the backbone is whole again, with the attention it was loaded with
    assert llm.model.config._attn_implementation == attn
    torch.testing.assert_close(pool_windows(llm, [window], layer=depth), pool_windows(llm, [window]))
    assert model_key(llm, "mean", 1) != model_key(llm, "mean") == model_key(llm, "mean", 0)
    with pytest.raises(UseripError, match=f"pool_layer {depth + 1}: .* has {depth} decoder blocks"):
        pool_windows(llm, [window], layer=depth + 1)


def test_resume_after_interruption_gives_identical_ids(llm, tmp_path):
    corpus = planted(llm.tokenizer, n_users=16)
    states = PooledStates(llm, cache=tmp_path / "c.safetensors")
    full = AmortisedFitter(llm, cfg(epochs=3), corpus, tmp_path / "a", states=states)
    full.fit(progress=False)
    first = AmortisedFitter(llm, cfg(epochs=3), corpus, tmp_path / "b", states=states)
    first.fit(epochs=1, progress=False)
    resumed = AmortisedFitter(llm, cfg(epochs=3), corpus, tmp_path / "b", states=states)
    st = resumed.fit(progress=False)
    assert [m["epoch"] for m in st.metrics] == [1, 2, 3]
    assert torch.equal(full.assignments(), resumed.assignments())
    assert torch.allclose(full.theta_table()[0], resumed.theta_table()[0])


def test_a_checkpoint_from_before_a_new_setting_resumes_while_the_setting_holds_its_default(llm, tmp_path):
    import json

    corpus = planted(llm.tokenizer, n_users=16)
    states = PooledStates(llm, cache=tmp_path / "c.safetensors")
    AmortisedFitter(llm, cfg(epochs=3), corpus, tmp_path / "b", states=states).fit(epochs=1, progress=False)
    last = tmp_path / "b" / "checkpoints" / "last.json"
    meta = json.loads(last.read_text())
    del meta["config"]["student"]  # written by a userip that had no such setting
    last.write_text(json.dumps(meta))
    st = AmortisedFitter(llm, cfg(epochs=2), corpus, tmp_path / "b", states=states).fit(progress=False)
    assert [m["epoch"] for m in st.metrics] == [1, 2], "resumed after epoch 1"
    meta = json.loads(last.read_text())
    del meta["config"]["student"]
    last.write_text(json.dumps(meta))
    changed = AmortisedFitter(llm, cfg(epochs=2, student="item"), corpus, tmp_path / "b", states=states)
    assert [m["epoch"] for m in changed.fit(progress=False).metrics] == [1, 2]
    assert json.loads(last.read_text())["config"]["student"] == "item", "a non-default value started afresh"


def _fit_and_reload(llm, tmp_path, conf: ProfileConfig, users: list[int]):
    """(the fit, a fresh fitter loaded from its written outputs over a corpus that holds ``users``' same train
    windows as new rows, those rows): the way ``profile infer`` sees a PROFILES dir."""
    from userip.profile.api import write_outputs

    corpus = planted(llm.tokenizer, n_users=24)
    states = PooledStates(llm, cache=tmp_path / "c.safetensors")
    fit = AmortisedFitter(llm, conf, corpus, tmp_path, states=states)
    fit.fit(progress=False)

    class _Data:
        fingerprint, path = "x", tmp_path

        @staticmethod
        def user_ids(idx):
            return [str(i) for i in idx]

    write_outputs(tmp_path / "out", fit, _Data, conf, "tiny", {})
    rows = [24 + 1 + i for i in range(len(users))]
    new = Corpus({r: corpus.train[u] for r, u in zip(rows, users, strict=True)}, {}, 24 + len(rows),
                 np.zeros(24 + len(rows) + 1, dtype=np.int64))
    inf = AmortisedFitter(llm, conf, new, None, states=states)
    inf.load_fitted(tmp_path / "out")
    return fit, inf, rows


def test_new_users_get_their_fitted_ids_with_no_gradient_step(llm, tmp_path):
    users = list(range(1, 11))
    fit, inf, rows = _fit_and_reload(llm, tmp_path, cfg(), users)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: pytest.fail("no autograd graph"), lambda t: t):
        z = inf.infer(torch.tensor(rows))
    assert torch.equal(z, fit.assignments()[users]), "the same history must give the same IDs"


def test_a_fitted_user_is_re_read_by_their_own_folds_map(llm, tmp_path):
    """With cross-fitting a fitted user's IDs come from their fold's map: a refresh from the same history (the
    user named as fitted) reproduces them; a user the fit never saw is read by the average of the maps."""
    users = list(range(1, 25))
    fit, inf, rows = _fit_and_reload(llm, tmp_path, cfg(cross_fit=2), users)
    assert torch.equal(inf.fitted_fold, fit.fold)
    z = inf.infer(torch.tensor(rows), fitted_rows=torch.tensor(users))
    assert torch.equal(inf.fold[rows], fit.fold[users])
    assert torch.equal(z, fit.assignments()[users]), "a refresh from the same history must give the fitted IDs"
    inf.infer(torch.tensor(rows))  # as new users: the average of the two maps
    feats = inf.features(rows)
    avg = (inf.maps[0](feats) + inf.maps[1](feats)) / 2
    assert torch.allclose(inf.profiles.table[inf.rows(torch.tensor(rows))], avg)
    assert not torch.allclose(avg, fit.profiles.table[fit.rows(torch.tensor(users))])


def test_context_nll_equals_the_naive_hf_loss_on_the_target_tokens(llm):
    tok = llm.tokenizer
    ctx = [tok.bos_token_id] + encode_context(tok, "The user watched:", "Heat: 2; Casino: 1")
    tgt = tok(" Toy Story: 5; Jumanji: 4", add_special_tokens=False)["input_ids"]
    marks = torch.tensor([rating_marks(tok, "Toy Story: 5; Jumanji: 4", 64)])
    sums, counts, msums, mcounts = ev.context_nll(llm, [ctx + tgt], [len(ctx)], marks)
    ids = torch.tensor([ctx + tgt])
    labels = ids.clone()
    labels[:, : len(ctx)] = -100
    with torch.no_grad():
        ref = llm.model(input_ids=ids, labels=labels).loss
    assert counts.item() == len(tgt)
    assert torch.allclose(sums / counts, ref, atol=1e-5)
    assert mcounts.item() == 2 and 0 < msums.item() < sums.item()


def test_rating_marks_pick_the_rating_tokens(llm):
    tok = llm.tokenizer
    text = "Toy Story: 5; Heat: 2"
    marks = rating_marks(tok, text, 64)
    ids = tok(" " + text, add_special_tokens=False)["input_ids"]
    marked = "".join(tok.decode([i]) for i, m in zip(ids, marks, strict=True) if m)
    assert marked.replace(" ", "") == "52"


def test_bootstrap_interval_and_verdict_follow_the_data():
    rng = np.random.default_rng(0)
    n = 200
    tokens = rng.integers(20, 40, n).astype(float)
    base = rng.normal(2.5, 0.3, n) * tokens

    def sums(shift):
        s = ev.UserSums(np.arange(n), {"mean": base.copy(), "own": base - shift * tokens},
                        {"mean": np.zeros(n), "own": np.zeros(n)}, tokens, np.zeros(n), tokens / 5)
        return s

    pos = ev.paired_gap(sums(rng.normal(0.05, 0.05, n)), "mean", "own", 1000, 0)
    assert pos["lo"] > 0 and pos["verdict"] == "positive"
    null = ev.paired_gap(sums(rng.normal(0.0, 0.05, n)), "mean", "own", 1000, 0)
    assert null["lo"] < 0 < null["hi"] and null["verdict"] == "interval includes 0"
    assert pos["item"] == pytest.approx(pos["token"] * 5, rel=1e-9)
    sel, rep = ev.halves(np.arange(n), 0)
    assert sel.sum() == rep.sum() == n // 2 and not (sel & rep).any()


def test_cross_fitting_never_trains_a_users_own_map_on_them(llm, tmp_path):
    corpus = planted(llm.tokenizer, n_users=16)
    f = AmortisedFitter(llm, cfg(cross_fit=2), corpus, None, states=PooledStates(llm, cache=tmp_path / "c"))
    assert len(f.maps) == 2 and set(f.fold[f.users].tolist()) == {0, 1}
    fold0 = [u for u in f.users.tolist() if int(f.fold[u]) == 0]
    before = [p.detach().clone() for p in f.maps.parameters()]
    seen = []
    f._targets = lambda users, g: seen.extend(users) or [0] * len(users)
    f.users = torch.tensor(fold0)  # one epoch over fold-0 users only
    f.train_epoch(torch.Generator().manual_seed(0), 1, False)
    after = list(f.maps.parameters())
    n0 = len(list(f.maps[0].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before[:n0], after[:n0], strict=True)), "map 0 must not move"
    assert any(not torch.equal(a, b) for a, b in zip(before[n0:], after[n0:], strict=True)), "map 1 must learn"
    # profiles are read by the user's own fold's map; a new user gets the average of the maps
    z = f.features(fold0[:2])
    assert torch.allclose(f.profiles.table[fold0[:2]], f.maps[0](z))
    assert torch.allclose(f.personal(z, None), (f.maps[0](z) + f.maps[1](z)) / 2)


def test_unseen_eval_users_are_never_trained_on(llm, tmp_path):
    corpus = planted(llm.tokenizer, n_users=16)
    f = AmortisedFitter(llm, cfg(unseen_eval_users=True, eval_users=6), corpus, None,
                        states=PooledStates(llm, cache=tmp_path / "c"))
    seen = []
    orig = f._targets
    f._targets = lambda users, g: seen.extend(users) or orig(users, g)
    f.train_epoch(torch.Generator().manual_seed(0), 1, False)
    assert len(f.eval_users) == 6 and seen and not set(seen) & set(f.eval_users.tolist())


def test_rating_pooling_reads_the_states_at_the_rating_tokens(llm, tmp_path):
    corpus = planted(llm.tokenizer, n_users=4)
    u = 1
    wins, marks = corpus.train[u], corpus.train_marks[u]
    assert [len(m) for m in marks] == [len(w) for w in wins] and all(any(m) for m in marks)
    got = pool_windows(llm, wins, "rating", marks=marks)
    # by hand: the last hidden state of [BOS] + window, averaged over the marked (rating) positions only
    bos = [int(llm.tokenizer.bos_token_id)] if llm.tokenizer.bos_token_id is not None else []
    ids = torch.tensor([bos + wins[0]])
    h = llm.model.model(input_ids=ids).last_hidden_state[0, len(bos):].float()
    ref = h[torch.tensor(marks[0])].mean(0)
    assert torch.allclose(got[0], ref, atol=1e-4)
    assert not torch.allclose(got[0], pool_windows(llm, wins[:1])[0], atol=1e-3)  # differs from the mean
    # a window without rating tokens falls back to the mean over its tokens
    none = pool_windows(llm, wins[:1], "rating", marks=[[False] * len(wins[0])])
    assert torch.allclose(none[0], pool_windows(llm, wins[:1])[0], atol=1e-5)
    with pytest.raises(ValueError, match="marks"):
        pool_windows(llm, wins, "rating")
    # the fitter passes the marks through, and refuses text without ratings
    f = AmortisedFitter(llm, cfg(pool="rating"), corpus, None,
                        states=PooledStates(llm, "rating", cache=tmp_path / "r.safetensors"))
    assert torch.allclose(f.states[u][0], got[0], atol=1e-4)
    plain = Corpus(corpus.train, corpus.heldout, corpus.n_users, corpus.activity)
    from userip.errors import UseripError

    with pytest.raises(UseripError, match="rated"):
        AmortisedFitter(llm, cfg(pool="rating"), plain, None, states=PooledStates(llm, "rating", cache=None))


def test_item_pooling_reads_each_interaction_alone_and_each_distinct_one_once(llm, tmp_path, monkeypatch):
    from userip.profile import pooled
    from userip.profile.template import encode_behaviour

    tok = llm.tokenizer
    wins = [encode_behaviour(tok, "Toy Story: 5; Heat: 2; Jumanji: 4", 64),
            encode_behaviour(tok, "Heat: 2; Casino: 1", 64), encode_behaviour(tok, "Toy Story: 5", 64)]
    # each interaction tokenises as it would on its own
    assert pooled.window_items(tok, wins[0]) == [encode_behaviour(tok, t, 64) for t in
                                                 ("Toy Story: 5", "Heat: 2", "Jumanji: 4")]
    read: list[list[int]] = []
    orig = pooled._pool
    monkeypatch.setattr(pooled, "_pool", lambda llm_, rows, *a: read.extend(rows) or orig(llm_, rows, *a))
    got = pool_windows(llm, wins, "item")
    assert sorted(map(tuple, read)) == sorted({tuple(encode_behaviour(tok, t, 64)) for t in
                                               ("Toy Story: 5", "Heat: 2", "Jumanji: 4", "Casino: 1")})
    monkeypatch.setattr(pooled, "_pool", orig)
    # a window is the mean of its items' mean-pooled states, each read without its neighbours
    alone = {t: pool_windows(llm, [encode_behaviour(tok, t, 64)])[0]
             for t in ("Toy Story: 5", "Heat: 2", "Jumanji: 4", "Casino: 1")}
    torch.testing.assert_close(got[0], (alone["Toy Story: 5"] + alone["Heat: 2"] + alone["Jumanji: 4"]) / 3,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], (alone["Heat: 2"] + alone["Casino: 1"]) / 2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], alone["Toy Story: 5"], atol=1e-4, rtol=1e-4)
    # in context the same window reads differently: what item pooling gives up
    assert not torch.allclose(got[0], pool_windows(llm, wins[:1])[0], atol=1e-3)
    # the fitter takes it as a pooling like any other, cached under its own key
    corpus = planted(tok, n_users=8)
    f = AmortisedFitter(llm, cfg(pool="item"), corpus, None,
                        states=PooledStates(llm, "item", cache=tmp_path / "i.safetensors"))
    torch.testing.assert_close(f.states[1], pool_windows(llm, corpus.train[1], "item"), atol=1e-5, rtol=1e-5)
    assert pooled.model_key(llm, "item") != pooled.model_key(llm, "mean")


def test_rating_weight_counts_the_rating_tokens_that_many_times(llm, tmp_path):
    corpus = planted(llm.tokenizer, n_users=4)
    states = PooledStates(llm, cache=tmp_path / "w.safetensors")
    plain = AmortisedFitter(llm, cfg(), corpus, None, states=states)
    heavy = AmortisedFitter(llm, cfg(rating_weight=4.0), corpus, None, states=states)
    users, target = [1, 2, 3], [0, 1, 2]
    theta = plain.shared_param.detach()[None].expand(3, -1, -1, -1)
    with torch.no_grad():
        sums, counts, loss = plain.row_loss(theta, users, target)
        s2, c2, weighted = heavy.row_loss(theta, users, target)
        # by hand, from the same token NLLs: rating tokens 4x in numerator and denominator
        batch_rows = [corpus.train[u][t] for u, t in zip(users, target, strict=True)]
        marks = ev.marks_tensor([corpus.train_marks[u][t] for u, t in zip(users, target, strict=True)])
        from userip.profile.template import make_batch

        _, _, msums, mcounts = plain.scorer.row_nll_marked(theta, make_batch(batch_rows), marks)
    assert torch.allclose(sums, s2) and torch.equal(counts, c2)
    assert torch.allclose(loss, sums / counts)
    assert (mcounts > 0).all()
    assert torch.allclose(weighted, (sums + 3 * msums) / (counts + 3 * mcounts), atol=1e-6)
    assert not torch.allclose(weighted, loss)


def test_pca_features_are_whitened_components_and_still_learn_the_groups(llm, tmp_path):
    from sklearn.metrics import adjusted_rand_score

    from userip.errors import UseripError

    corpus = planted(llm.tokenizer)
    f = AmortisedFitter(llm, cfg(pca=4, pool="rating"), corpus, None,
                        states=PooledStates(llm, "rating", cache=tmp_path / "p.safetensors"))
    z = f.features(sorted(corpus.train))
    assert z.shape == (32, 4) and f.map.B[0].shape == (4, 4)
    assert torch.allclose(z.std(0), torch.ones(4), atol=1e-3)  # whitened: unit variance per component
    assert torch.allclose(z.T @ z / 31, torch.eye(4), atol=1e-3)  # and uncorrelated
    f.fit(progress=False)
    groups = np.array([u % 2 for u in range(1, 33)])
    ids = f.assignments()[1:].numpy()
    assert max(adjusted_rand_score(groups, ids[:, k]) for k in range(2)) > 0.6
    assert "map.basis" in f.output_tensors()
    # a new-user fitter (two users: too few to estimate components) reads the saved basis and agrees
    two = Corpus({u: corpus.train[u] for u in (1, 2)}, {}, corpus.n_users, corpus.activity,
                 train_marks={u: corpus.train_marks[u] for u in (1, 2)})
    h = AmortisedFitter(llm, cfg(pca=4, pool="rating"), two, None,
                        states=PooledStates(llm, "rating", cache=tmp_path / "p.safetensors"))
    h.load_map_state(f.output_tensors())
    assert torch.allclose(h.features([1, 2]), f.features([1, 2]), atol=1e-5)
    # too few users to estimate the components: a clear error, not a silent zero feature
    few = planted(llm.tokenizer, n_users=4)
    g = AmortisedFitter(llm, cfg(pca=8), few, None, states=PooledStates(llm, cache=tmp_path / "q.safetensors"))
    with pytest.raises(UseripError, match="pca 8"):
        g.fit(progress=False)
