"""A second LLM family through the profile path: a tiny random Gemma-3 (text-only) built from its config.

What differs from the Llama path and is checked here: Gemma scales its input embeddings by sqrt(hidden) inside
``embed_tokens`` (and skips that when handed ``inputs_embeds``), mixes sliding-window and full-attention layers
(a prepared 4-D mask bypasses transformers' window), and has a 262k vocabulary (LM-head chunking).
"""

import math

import numpy as np
import pytest
import torch

from userip.llm import tiny_gemma3_llm
from userip.profile import ProfileConfig
from userip.profile.amortised import AmortisedFitter
from userip.profile.em import ProfileFitter
from userip.profile.model import Scorer, text_init_embeddings
from userip.profile.pooled import PooledStates
from userip.profile.template import attention_mask, make_batch

TEMPLATE = "The user's hobby is {hobby}. The user's background is {background}. The user watched: {behaviour}"
ROWS = (" Toy Story (1995); Heat (1995); GoldenEye (1995); Casino (1995)", " Casino (1995)",
        " crime thriller; war western; love music; action comedy drama")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("USERIP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3_llm(seed=0)


def _cfg(**kw):
    base = dict(profiles=[{"name": "hobby", "codebook_size": 2}, {"name": "background", "codebook_size": 2}],
                template=TEMPLATE, batch_users=8, epochs=2, max_tokens=48, mask="causal", patience=10,
                bootstrap=50)
    base.update(kw)
    return ProfileConfig(**base)


def test_the_tiny_model_is_a_gemma3_with_what_makes_it_different(gemma):
    c = gemma.model.config
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM" and c.vocab_size == 262_144
    assert set(c.layer_types) == {"sliding_attention", "full_attention"} and c.sliding_window == 8
    assert math.isclose(float(gemma.input_embeddings().embed_scale), math.sqrt(c.hidden_size), rel_tol=1e-6)


def test_text_init_is_in_the_scaled_input_space(gemma):
    cfg = _cfg()
    init = text_init_embeddings(gemma, cfg)
    ids = gemma.tokenizer(" hobby", add_special_tokens=False)["input_ids"]
    embed = gemma.input_embeddings()
    assert torch.allclose(init[0, 0], embed(torch.tensor(ids[:1]))[0].float())
    raw = embed.weight[ids[0]].float()
    assert torch.allclose(init[0, 0], raw * math.sqrt(gemma.hidden_size), rtol=1e-5)  # not the raw row


def _full_ids(scorer, slot_ids, row):
    ids = scorer.layout.prefix_ids.clone()
    for k, pos in enumerate(scorer.layout.soft_positions):
        ids[pos] = slot_ids[k]
    return torch.cat([ids, torch.tensor(row)])


def test_template_path_scores_exactly_what_hf_scores_on_the_same_text(gemma):
    """Soft tokens set to the module embeddings of real tokens: our path (inputs_embeds, 4-D mask with the
    window applied per layer type, LM head at target positions in 256-row chunks) equals the plain HF loss
    on the token ids, with the sliding window binding (rows of 27..40 tokens, window 8)."""
    cfg = _cfg(ce_chunk=1024)
    scorer = Scorer(gemma, cfg)
    assert scorer.ce_chunk == 256  # 2^26 logits per chunk at a 262k vocabulary
    tok = gemma.tokenizer
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in ROWS]
    batch = make_batch(rows)
    slot_ids = [tok(" music", add_special_tokens=False)["input_ids"][0],
                tok(" space", add_special_tokens=False)["input_ids"][0]]
    embed = gemma.input_embeddings()
    with torch.no_grad():
        theta = embed(torch.tensor(slot_ids))[None, :, None].expand(len(rows), -1, -1, -1).clone()
        sums, counts = scorer.row_nll(theta, batch)
        P = scorer.layout.prefix_len
        assert P + min(len(r) for r in rows) > 2 * gemma.model.config.sliding_window
        for i, r in enumerate(rows):
            ids = _full_ids(scorer, slot_ids, r)[None]
            labels = torch.full_like(ids, -100)
            labels[0, P:] = ids[0, P:]
            ref = gemma.model(input_ids=ids, labels=labels).loss  # mean over the behaviour tokens
            assert torch.allclose(sums[i] / counts[i], ref, atol=1e-5), (i, float(sums[i] / counts[i]), float(ref))
        # the two risks are real: raw embedding rows, or one 4-D mask for every layer, score something else
        raw = embed.weight[torch.tensor(slot_ids)][None, :, None].expand(len(rows), -1, -1, -1)
        assert not torch.allclose(scorer.row_nll(raw, batch)[0], sums, atol=1e-3)
        x = scorer.embed_rows(theta, batch)
        L = x.shape[1]
        mask = attention_mask(scorer.layout, batch.lengths, "causal", scorer.dtype)
        pos = torch.arange(L)[None].expand(len(rows), -1)
        h_one = scorer.backbone(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
        h_ours = scorer.hidden_states(theta, batch)
        real = P + batch.lengths[0] - 1
        assert not torch.allclose(h_one[0, :real], h_ours[0, :real], atol=1e-4)


def test_profile_mask_rows_are_the_same_alone_and_in_a_padded_batch(gemma):
    scorer = Scorer(gemma, _cfg(mask="profile"))
    rows = [gemma.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ROWS]
    theta = torch.randn(3, 2, 1, gemma.hidden_size) * 3
    with torch.no_grad():
        both, _ = scorer.row_nll(theta, make_batch(rows))
        for i, r in enumerate(rows):
            alone, _ = scorer.row_nll(theta[i : i + 1], make_batch([r]))
            assert torch.allclose(alone[0], both[i], atol=1e-4)
    assert torch.isfinite(both).all()


def _planted(tok, n_users=12, seed=0):
    from userip.profile import Corpus

    a = ["Toy Story: 5", "Jumanji: 4", "children comedy: 5", "love music: 4"]
    b = ["Heat: 2", "Casino: 1", "crime thriller: 2", "war western: 1"]
    rng = np.random.default_rng(seed)
    train, held, ctx = {}, {}, {}
    for u in range(1, n_users + 1):
        vocab = a if u % 2 else b
        train[u] = ["; ".join(rng.choice(vocab, 4)) for _ in range(2)]
        held[u] = ["; ".join(rng.choice(vocab, 4))]
        ctx[u] = "; ".join(rng.choice(vocab, 5))
    act = np.zeros(n_users + 1, dtype=np.int64)
    act[1:] = rng.integers(5, 50, n_users)
    return Corpus.from_text(tok, train, held, n_users, act, 48, context=ctx, lead_in="The user watched:",
                            rated=True)


@pytest.mark.parametrize("inference", ["amortised", "em"])
def test_a_short_fit_runs_and_lowers_the_training_loss(gemma, tmp_path, inference):
    corpus = _planted(gemma.tokenizer)
    if inference == "amortised":
        cfg = _cfg(inference="amortised", mask="profile", epochs=3, rank=4, lr_map=0.05, lr_shared=0.3)
        f = AmortisedFitter(gemma, cfg, corpus, None, states=PooledStates(gemma, cache=tmp_path / "c.safetensors"))
    else:
        cfg = _cfg(inference="em", mask="profile", epochs=3, inner_steps=2, prior_lambda=0.01, prior_beta=0.01)
        f = ProfileFitter(gemma, cfg, corpus, None)
    st = f.fit(progress=False)
    train = [m["train_nll"] for m in st.metrics]
    assert all(np.isfinite(train)) and train[-1] < train[0], train
    z = f.assignments()[f.all_users]
    assert ((z >= 1) & (z <= 2)).all()
    assert np.isfinite(st.final["heldout"]["own"])
