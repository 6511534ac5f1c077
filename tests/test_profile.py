import numpy as np
import pytest
import torch

from helpers import planted_corpus
from userip.errors import UseripError
from userip.llm import tiny_llm
from userip.profile import Corpus, ProfileConfig, ProfileFitter, RowAdam
from userip.profile.model import Scorer
from userip.profile.template import make_batch


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(seed=0)


def small_cfg(**kw):
    base = dict(profiles=[{"name": "hobby", "codebook_size": 2}, {"name": "background", "codebook_size": 2}],
                batch_users=8, epochs=3, inner_steps=3, max_tokens=64, prior_lambda=0.01, prior_beta=0.01,
                patience=10)
    base.update(kw)
    return ProfileConfig(**base)


@pytest.mark.parametrize("mask", ["profile", "causal"])
def test_row_loss_is_the_same_alone_and_in_a_padded_batch(llm, mask):
    scorer = Scorer(llm, small_cfg(mask=mask))
    tok = llm.tokenizer
    short = tok(" Toy Story (1995)", add_special_tokens=False)["input_ids"]
    long = tok(" Heat (1995); Casino (1995); Jumanji (1995); crime thriller", add_special_tokens=False)["input_ids"]
    theta = torch.randn(2, 2, 1, 32)
    with torch.no_grad():
        alone, _ = scorer.row_nll(theta[:1], make_batch([short]))
        both, counts = scorer.row_nll(theta, make_batch([short, long]))
    assert counts.tolist() == [len(short), len(long)]
    assert torch.allclose(alone[0], both[0], atol=1e-5)


def _soft_hidden(scorer, theta, batch, k):
    pos = int(scorer.layout.soft_positions[k][0])
    with torch.no_grad():
        return scorer.hidden_states(theta, batch)[:, pos]


def test_profile_mask_isolates_profiles_and_causal_does_not(llm):
    tok = llm.tokenizer
    batch = make_batch([tok(" Heat (1995)", add_special_tokens=False)["input_ids"]])
    theta = torch.randn(1, 2, 1, 32)
    changed = theta.clone()
    changed[:, 0] += 1.0  # another hobby soft token
    # hobby name texts with the same token count, so positions (RoPE) stay equal
    t1 = "The user's hobby is {hobby}. The user's background is {background}. The user watched: {behaviour}"
    t2 = "The user's music is {hobby}. The user's background is {background}. The user watched: {behaviour}"
    assert len(tok(t1.split("{hobby}")[0])["input_ids"]) == len(tok(t2.split("{hobby}")[0])["input_ids"])
    for mask, isolated in (("profile", True), ("causal", False)):
        s1 = Scorer(llm, small_cfg(mask=mask, template=t1))
        s2 = Scorer(llm, small_cfg(mask=mask, template=t2))
        h_bg = _soft_hidden(s1, theta, batch, 1)
        assert torch.equal(h_bg, _soft_hidden(s2, theta, batch, 1)) == isolated  # hobby name text changed
        assert torch.equal(h_bg, _soft_hidden(s1, changed, batch, 1)) == isolated  # hobby soft token changed
        # the behaviour always sees every profile
        pos = s1.layout.prefix_len
        with torch.no_grad():
            a = s1.hidden_states(theta, batch)[:, pos]
            b = s1.hidden_states(changed, batch)[:, pos]
        assert not torch.equal(a, b)


def test_frozen_llm_gets_no_gradient_and_soft_tokens_do(llm):
    corpus = planted_corpus(llm.tokenizer, n_users=8)
    f = ProfileFitter(llm, small_cfg(), corpus)
    before = f.profiles.table.clone()
    users = torch.tensor([1, 2, 3])
    f.train_step(users, [corpus.train[u][0] for u in users.tolist()], update_shared=True)
    assert all(p.grad is None and not p.requires_grad for p in llm.model.parameters())
    moved = (f.profiles.table != before).flatten(1).any(1)
    assert moved[users].all()
    assert not moved[[0, 4, 5, 6, 7, 8]].any(), "rows outside the batch must be bit-identical"


def test_row_adam_touches_only_batch_rows_and_first_update_matches_adam():
    torch.manual_seed(0)
    table = torch.randn(6, 3)
    opt = RowAdam(table, lr=0.05)
    for _ in range(20):  # rows 1 and 2 take many steps first
        opt.step(torch.tensor([1, 2]), torch.randn(2, 3))
    untouched = table[[0, 3, 4, 5]].clone()
    g = torch.randn(1, 3)
    row = table[4].clone().requires_grad_(True)
    ref = torch.optim.Adam([row], lr=0.05)
    row.grad = g[0].clone()
    ref.step()
    opt.step(torch.tensor([4]), g)
    assert torch.allclose(table[4], row.detach(), atol=1e-7), "a row's first update must equal plain Adam's"
    assert torch.equal(table[[0, 3, 5]], untouched[[0, 1, 3]])
    assert opt.steps.tolist() == [0, 20, 20, 0, 1, 0]


def test_micro_batching_gives_the_same_update(llm):
    corpus = planted_corpus(llm.tokenizer, n_users=8)
    users = torch.tensor([1, 2, 3, 4])
    rows = [corpus.train[u][0] for u in users.tolist()]
    tables = []
    for mb in (0, 2):
        f = ProfileFitter(llm, small_cfg(micro_batch=mb), corpus)
        f.train_step(users, rows, update_shared=True)
        tables.append((f.profiles.table.clone(), f.profiles.shared.clone()))
    assert torch.allclose(tables[0][0], tables[1][0], atol=1e-6)
    assert torch.allclose(tables[0][1], tables[1][1], atol=1e-6)


def test_em_lowers_nll_and_recovers_planted_groups(llm):
    from sklearn.metrics import adjusted_rand_score

    corpus = planted_corpus(llm.tokenizer, n_users=32)
    f = ProfileFitter(llm, small_cfg(epochs=4), corpus)
    st = f.fit(progress=False)
    train = [m["train_nll"] for m in st.metrics]
    assert train[-1] < train[0] - 0.05, train
    held = [m["heldout"]["own"] for m in st.metrics]
    assert min(held) < held[0]
    groups = np.array([u % 2 for u in range(1, 33)])
    z = f.assignments()[1:].numpy()
    best = max(adjusted_rand_score(groups, z[:, k]) for k in range(2))
    assert best > 0.6, f"codes should follow the planted groups, ARI={best:.2f}"
    for name in ("hobby", "background"):
        assert st.metrics[-1]["codes"][name]["dead"] == 0


def test_joint_and_plain_modes_fit(llm):
    corpus = planted_corpus(llm.tokenizer, n_users=12)
    for kw in ({"mode": "joint"}, {"table": "plain"}, {"table": "plain", "init": "uniform"}):
        f = ProfileFitter(llm, small_cfg(epochs=2, **kw), corpus)
        st = f.fit(progress=False)
        z = f.assignments()[1:]
        assert z.min() >= 1 and z[:, 0].max() <= 2
        assert len(st.metrics) == 2 and np.isfinite(st.metrics[-1]["heldout"]["own"])


def test_resume_after_interruption_gives_identical_ids(llm, tmp_path):
    corpus = planted_corpus(llm.tokenizer, n_users=16)
    full = ProfileFitter(llm, small_cfg(epochs=3), corpus, tmp_path / "a")
    full.fit(progress=False)
    first = ProfileFitter(llm, small_cfg(epochs=3), corpus, tmp_path / "b")
    first.fit(epochs=1, progress=False)  # "killed" after one epoch: only its checkpoint survives
    assert (tmp_path / "b" / "checkpoints" / "epoch0001.rank0-of-1.safetensors").exists()
    resumed = ProfileFitter(llm, small_cfg(epochs=3), corpus, tmp_path / "b")
    st = resumed.fit(progress=False)
    assert [m["epoch"] for m in st.metrics] == [1, 2, 3]
    assert torch.equal(full.assignments(), resumed.assignments())
    assert torch.equal(full.theta_table()[0], resumed.theta_table()[0])


def test_golden_losses_are_pinned(llm):
    """Fixed seed, three E-steps: pinned NLLs catch any silent change of the objective or the batch layout."""
    corpus = planted_corpus(llm.tokenizer, n_users=8, seed=1)
    f = ProfileFitter(llm, small_cfg(seed=5), corpus)
    users = torch.tensor([1, 2, 3, 4])
    losses = []
    for j in range(3):
        s, n = f.train_step(users, [corpus.train[u][j % 3] for u in users.tolist()], update_shared=True)
        losses.append(s / n)
    assert losses == pytest.approx(GOLDEN, abs=1e-4)


GOLDEN = [6.275994, 6.111192, 5.849277]


def test_config_validation():
    with pytest.raises(UseripError, match="duplicate"):
        ProfileConfig(profiles=[{"name": "a"}, {"name": "a"}], template="{a} {behaviour}")
    with pytest.raises(UseripError, match="slot"):
        ProfileConfig(profiles=[{"name": "hobby"}], template="The user watched: {behaviour}")
    with pytest.raises(UseripError, match="mode"):
        ProfileConfig(mode="magic")
    with pytest.raises(UseripError, match="unknown keys"):
        ProfileConfig.from_dict({"epochz": 3})


def test_infer_new_users_mostly_recovers_their_fitted_codes(llm, tmp_path):
    """Re-inferring fitted users from scratch, with everything else frozen, lands on the same codes."""
    corpus = planted_corpus(llm.tokenizer, n_users=32)
    fit = ProfileFitter(llm, small_cfg(epochs=4), corpus, tmp_path)
    fit.fit(progress=False)
    fitted = fit.assignments()
    users = list(range(1, 13))
    rows = [32 + 1 + i for i in range(len(users))]  # appended rows, as for users of a newer export
    new = Corpus({r: corpus.train[u] for r, u in zip(rows, users, strict=True)}, {}, 32 + len(rows),
                 np.zeros(32 + len(rows) + 1, dtype=np.int64))
    from userip.profile.api import write_outputs

    class _Data:  # the bits of PreparedData that write_outputs reads
        fingerprint, path = "x", tmp_path

        @staticmethod
        def user_ids(idx):
            return [str(i) for i in idx]

    write_outputs(tmp_path / "out", fit, _Data, small_cfg(epochs=4), "tiny", {})
    inf = ProfileFitter(llm, small_cfg(epochs=4), new, tmp_path / "inf")
    inf.load_fitted(tmp_path / "out")
    before = inf.profiles.table[1:33].clone()
    z = inf.infer(torch.tensor(rows))
    assert torch.equal(inf.profiles.table[1:33], before), "fitted users' rows must not move"
    agree = (z == fitted[users]).all(1).float().mean().item()
    assert agree >= 0.7, f"only {agree:.0%} of re-inferred users got their fitted codes"


def test_fast_loss_equals_the_naive_hf_loss(llm):
    """The fast path (LM head at target positions only, chunked CE, 4-D mask) scores exactly what the naive
    HF call with labels= over the full vocabulary at every position scores (causal mask, fp32)."""
    cfg = small_cfg(mask="causal", ce_chunk=7)  # a chunk size that splits rows mid-way
    scorer = Scorer(llm, cfg)
    tok = llm.tokenizer
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in
            (" Toy Story (1995); Heat (1995)", " Casino (1995)", " crime thriller; war western; love music")]
    batch = make_batch(rows)
    theta = torch.randn(3, 2, 1, 32)
    with torch.no_grad():
        sums, counts = scorer.row_nll(theta, batch)
        x = scorer.embed_rows(theta, batch)
        P = scorer.layout.prefix_len
        L = x.shape[1]
        attn = (torch.arange(L)[None] < (P + batch.lengths)[:, None]).long()
        labels = torch.full((3, L), -100)
        for i, r in enumerate(rows):
            labels[i, P : P + len(r)] = torch.tensor(r)
        ref = llm.model(inputs_embeds=x, attention_mask=attn, labels=labels).loss
    assert torch.allclose(sums.sum() / counts.sum(), ref, atol=1e-5), (float(sums.sum() / counts.sum()), float(ref))
