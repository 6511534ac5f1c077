"""Explanations of profile codes and the validity probe."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny, write_csv
from userip.explain import (
    AGE_LABELS,
    PhraseDecoder,
    TokenIndex,
    activity_frame,
    age_bucket,
    code_lifts,
    explain,
    explanations_markdown,
    generation_template,
    id_space_size,
    lift,
    permuted_ids,
    phrase_prompt,
    probe,
    probe_markdown,
    word_like,
)
from userip.profile.config import DEFAULT_TEMPLATE, ProfileConfig


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llm():
    from userip.llm import tiny_llm

    return tiny_llm()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, llm) -> SimpleNamespace:
    """A tiny dataset and a 1-epoch profile fit on it with the tiny LLM."""
    from userip.data import prepare
    from userip.profile import fit_profiles

    root = tmp_path_factory.mktemp("explain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("USERIP_CACHE_DIR", str(root / "cache"))
        ds = write_csv(make_tiny(), root / "csv")
        prepare(root / "data", interactions=ds.interactions, items=ds.items, users=ds.users, config=ds.config)
        fit_profiles(root / "data", root / "prof", llm=llm, epochs=1, batch_users=8, progress=False)
    return SimpleNamespace(data=root / "data", profiles=root / "prof")


# ---------------------------------------------------------------------------------------------- explain
def test_explain_tiny_profiles(fitted, llm, tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    expl = explain(fitted.profiles, fitted.data, llm=llm, top_k=5, min_users=1, min_interactions=1, out=out)
    on_disk = json.loads(out.read_text())
    assert on_disk["profiles"].keys() == expl["profiles"].keys() == {"hobby", "background"}
    ids = pd.read_parquet(fitted.profiles / "profile_ids.parquet")
    for name, K in (("hobby", 4), ("background", 3)):
        prof = on_disk["profiles"][name]
        assert [c["code"] for c in prof["codes"]] == list(range(1, K + 1))
        assert sum(c["users"] for c in prof["codes"]) == len(ids)
        assert isinstance(prof["population_phrase"], str)
        for c in prof["codes"]:
            assert c["users"] == int((ids[name] == c["code"]).sum())
            for key in ("tokens", "offset_tokens"):
                assert 0 < len(c[key]) <= 5
                assert all(t.isascii() and t.isalpha() and len(t) >= 3 for t in c[key])
            assert isinstance(c["phrase"], str)
            assert all(g["lift"] > 1 for g in c["genres"]) and all(t["lift"] > 1 for t in c["titles"])
    md = explanations_markdown(expl)
    assert "### hobby" in md and "### background" in md and "| code | users |" in md


def test_explain_data_dir_missing_is_a_clear_error(fitted, llm, tmp_path: Path) -> None:
    import shutil

    from userip.errors import UseripError
    from userip.io import read_yaml, write_yaml

    prof = tmp_path / "prof"
    shutil.copytree(fitted.profiles, prof)
    conf = read_yaml(prof / "config.yaml")
    conf["data_dir"] = str(tmp_path / "nowhere")
    write_yaml(prof / "config.yaml", conf)
    with pytest.raises(UseripError, match="data_dir"):
        explain(prof, llm=llm, write=False)
    conf["data_dir"] = str(fitted.data)  # the recorded data dir is the default
    write_yaml(prof / "config.yaml", conf)
    expl = explain(prof, llm=llm, write=False)
    assert expl["data_dir"] == str(fitted.data) and not (prof / "explanations.json").exists()


def test_cli_explain(fitted, llm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import userip.llm
    from userip.cli import app

    monkeypatch.setattr(userip.llm, "load_llm", lambda *a, **k: llm)
    out = tmp_path / "x.json"
    res = CliRunner().invoke(app, ["explain", str(fitted.profiles), "--data", str(fitted.data), "--out", str(out),
                                   "--top-k", "3", "--max-new-tokens", "4", "--probe"])
    assert res.exit_code == 0, res.output
    assert "Profile explanations" in res.output and "Validity probe" in res.output
    saved = json.loads(out.read_text())
    assert {r["source"] for r in saved["probe"]} == {"profile IDs", "permuted IDs", "activity buckets"}
    assert all(len(c["tokens"]) <= 3 for c in saved["profiles"]["hobby"]["codes"])


def test_word_like() -> None:
    assert word_like("Ġhobby") == "hobby" and word_like("▁Drama") == "Drama" and word_like("cat") == "cat"
    for bad in ("Ġto", "ab", "Ġ1995", "Ġ", "ĠSci-Fi", "Ã©t", "<|im_end|>"):
        assert word_like(bad) is None, bad


def test_generation_template_replaces_the_tail() -> None:
    names = ["hobby", "background"]
    t = generation_template(DEFAULT_TEMPLATE, names)
    assert t == ("The user's hobby is {hobby}. The user's background is {background}. "
                 "In short, this user likes {behaviour}")
    ProfileConfig(template=t)  # still a valid profile template
    assert phrase_prompt(DEFAULT_TEMPLATE, names, "So:") == (
        "The user's hobby is <hobby>. The user's background is <background>. So:")


def test_decoder_cache_matches_full_recompute(llm) -> None:
    """Greedy decoding with the KV cache gives what re-running the whole sequence each step gives."""
    cfg = ProfileConfig()
    dec = PhraseDecoder(llm, cfg)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 2, 1, llm.hidden_size, generator=g) * 0.3
    emb = llm.input_embeddings()
    x = dec.embed(theta)
    assert torch.equal(x[:, dec.layout.soft_positions[1]], theta[:, 1])
    ids = []
    with torch.no_grad():
        for _ in range(6):
            nxt = llm.model(inputs_embeds=x).logits[:, -1].argmax(-1)
            ids.append(nxt)
            x = torch.cat([x, emb(nxt)[:, None]], 1)
    eos = llm.tokenizer.eos_token_id
    want = []
    for row in torch.stack(ids, 1).tolist():
        row = row[: row.index(eos)] if eos in row else row
        want.append(llm.tokenizer.decode(row, skip_special_tokens=True))
    got = dec.decode(theta, max_new_tokens=6)
    from userip.explain.explain import _clean

    assert got == [_clean(w) for w in want]


# ---------------------------------------------------------------------------------------------- lift
def test_lift_hand_made() -> None:
    # group: 8 units, A 6, B 2; population: 40 units, A 10, B 20, C 10
    df = lift({"A": 6, "B": 2}, 8, {"A": 10, "B": 20, "C": 10}, 40)
    assert list(df.index) == ["A", "B"]
    assert df.loc["A", "share"] == pytest.approx(0.75) and df.loc["A", "base_share"] == pytest.approx(0.25)
    assert df.loc["A", "lift"] == pytest.approx(3.0) and df.loc["B", "lift"] == pytest.approx(0.5)
    assert list(lift({"A": 6, "B": 2}, 8, {"A": 10, "B": 20}, 40, min_count=3).index) == ["A"]
    assert lift({}, 0, {"A": 1}, 1).empty
    with pytest.raises(ValueError):
        lift({"A": 5}, 5, {"A": 2}, 10)


def test_code_lifts_hand_made() -> None:
    # users 1, 2 hold code 1; users 3, 4 code 2. Items: 1 Action, 2 Drama, 3 Action+Comedy.
    rows = [(1, 1), (1, 3), (2, 1), (2, 3), (3, 2), (3, 2), (4, 2), (4, 1)]
    inter = pd.DataFrame(rows, columns=["user_idx", "item_idx"]).assign(split="train")
    inter = pd.concat([inter, pd.DataFrame({"user_idx": [3], "item_idx": [3], "split": ["val"]})])
    items = pd.DataFrame({"item_idx": [1, 2, 3], "title": ["X", "Y", "Z"],
                          "genres": [["Action"], ["Drama"], ["Action", "Comedy"]]})
    data = SimpleNamespace(interactions=inter, items=items)
    ids = pd.DataFrame({"user_idx": [1, 2, 3, 4], "hobby": [1, 1, 2, 2]})
    out = code_lifts(data, ids, "hobby", min_users=1, min_interactions=1)
    assert out[1]["users"] == 2 and out[1]["interactions"] == 4
    # code 1: Action 4/4 interactions vs 5/8 overall -> 1.6; Comedy 2/4 vs 2/8 -> 2.0; Drama absent
    g = {d["genre"]: d["lift"] for d in out[1]["genres"]}
    assert g == pytest.approx({"Comedy": 2.0, "Action": 1.6})
    assert [d["genre"] for d in out[1]["genres"]] == ["Comedy", "Action"]
    # titles count users: Z watched by 2/2 of code 1 vs 2/4 overall -> 2; X by 2/2 vs 3/4 -> 4/3
    t = {d["title"]: d["lift"] for d in out[1]["titles"]}
    assert t == pytest.approx({"Z": 2.0, "X": 4 / 3})
    # code 2: Drama 3/4 vs 3/8 -> 2 (the repeated watch counts twice as interactions, once as a user)
    assert out[2]["genres"][0] == pytest.approx(
        {"genre": "Drama", "lift": 2.0, "share": 0.75, "base_share": 0.375, "interactions": 3})
    assert out[2]["titles"][0]["title"] == "Y" and out[2]["titles"][0]["users"] == 2
    # support filters
    assert code_lifts(data, ids, "hobby", min_users=3, min_interactions=5)[1] == {
        "users": 2, "interactions": 4, "genres": [], "titles": []}


# ---------------------------------------------------------------------------------------------- probe
def _planted(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    gender = np.where(rng.random(n) < 0.6, "M", "F")
    users = pd.DataFrame({
        "user_idx": np.arange(1, n + 1),
        "gender": gender,
        "age": rng.integers(10, 70, n),
        "occupation": rng.choice(["student", "engineer", "artist"], n),
    })
    ids = pd.DataFrame({"user_idx": users["user_idx"], "hobby": np.where(gender == "M", 1, 2).astype(np.int64)})
    return ids, users


def test_probe_planted_gender() -> None:
    ids, users = _planted()
    df = probe({"profile IDs": ids, "permuted IDs": permuted_ids(ids, seed=1)}, users, seed=0)
    assert len(df) == 6 and set(df["target"]) == {"age_bucket", "gender", "occupation"}
    r = df.set_index(["source", "target"])
    real, perm = r.loc[("profile IDs", "gender")], r.loc[("permuted IDs", "gender")]
    majority = (users["gender"] == "M").mean()
    assert real["nmi"] > 0.99 and real["ami"] > 0.99 and real["accuracy"] > 0.99
    assert real["majority"] == pytest.approx(majority, abs=0.02)
    assert perm["nmi"] < 0.05 and abs(perm["accuracy"] - perm["majority"]) < 0.06
    assert r.loc[("profile IDs", "occupation"), "nmi"] < 0.05  # gender IDs say nothing about occupation
    assert r.loc[("profile IDs", "gender"), "id_tuples"] == 2


def test_permuted_ids_keep_tuples() -> None:
    ids = pd.DataFrame({"user_idx": np.arange(1, 101), "a": np.arange(100) % 4 + 1, "b": np.arange(100) % 3 + 1})
    p = permuted_ids(ids, seed=3)
    assert (p["user_idx"] == ids["user_idx"]).all()
    assert not (p[["a", "b"]].to_numpy() == ids[["a", "b"]].to_numpy()).all()
    before = ids[["a", "b"]].value_counts().sort_index()
    assert before.equals(p[["a", "b"]].value_counts().sort_index())  # tuples moved jointly
    assert id_space_size(ids) == 12


def test_activity_buckets_are_the_ctr_control() -> None:
    """The probe's activity control is the CTR table's +activity: quantile buckets of the train interaction
    count, at most as many as distinct counts, equal counts in one bucket (no tie broken at random)."""
    from userip.ctr import activity_buckets as ctr_activity_buckets

    rng = np.random.default_rng(0)
    counts = rng.choice([5, 5, 5, 20, 40], 200)  # many ties
    inter = pd.DataFrame({"user_idx": np.repeat(np.arange(1, 201), counts)}).assign(split="train")
    inter = pd.concat([inter, pd.DataFrame({"user_idx": [1] * 50, "split": "test"})])
    b = activity_frame(inter, 12)
    act = pd.Series(counts, index=np.arange(1, 201))[b["user_idx"]].to_numpy()
    want, k = ctr_activity_buckets(np.r_[0, act], 12)
    assert k == 3 and b["activity"].tolist() == want[1:].tolist()  # 3 distinct counts: at most 3 buckets
    assert (b.assign(act=act).groupby("act")["activity"].nunique() == 1).all()  # equal counts share a bucket
    order = b.assign(act=act).groupby("activity")["act"].agg(["min", "max"])
    assert (order["max"].to_numpy()[:-1] <= order["min"].to_numpy()[1:]).all()  # buckets are ordered
    sub = activity_frame(SimpleNamespace(interactions=inter), 3, users=[1, 2, 3, 999])
    assert list(sub["user_idx"]) == [1, 2, 3, 999] and sub["activity"].iloc[-1] == 1  # no train rows: count 0


def test_age_buckets() -> None:
    ages = [1, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 90]
    want = ["<18", "<18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44", "45-49", "45-49", "50-55",
            "50-55", "56+", "56+"]
    assert list(age_bucket(ages)) == want and set(want) == set(AGE_LABELS)
    assert age_bucket(pd.array([None, 30], dtype="Int64")).tolist() == [None, "25-34"]


def test_probe_markdown_headers() -> None:
    ids, users = _planted(60)
    md = probe_markdown(probe({"profile IDs": ids}, users, targets=("gender",)))
    assert md.splitlines()[0].startswith("| source | target | users |")
    for h in ("NMI", "AMI", "accuracy", "majority"):
        assert h in md.splitlines()[0]
    assert "| profile IDs | gender |" in md


def test_token_index_prefers_word_starts() -> None:
    pieces = ["Ġhobby", "irst", "ĠHobby", "Ġto", "Ġcat", "dog", "Ġ1995"]
    emb = torch.nn.Embedding(len(pieces), 4)
    with torch.no_grad():
        emb.weight.copy_(torch.eye(4)[[0, 1, 0, 2, 3, 1, 2]] + 0.01)
    fake = SimpleNamespace(name="fake", input_embeddings=lambda: emb,
                           tokenizer=SimpleNamespace(convert_ids_to_tokens=lambda ids: [pieces[i] for i in ids]))
    idx = TokenIndex(fake, min_words=1)
    assert idx.words == ["hobby", "cat"]  # no continuation pieces, no duplicates by case
    assert idx.nearest(torch.eye(4)[[0, 3]], 1) == [["hobby"], ["cat"]]
    assert TokenIndex(fake, min_words=5).words == ["hobby", "irst", "cat", "dog"]  # fallback: all word-like
