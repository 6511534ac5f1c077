"""CTR stage: backbones, trainer, variants, results files, and the train_ctr/CLI wiring.

Everything runs on small synthetic example sets (tests/ctr_world.py; no userip.data / userip.bank needed);
train_ctr and the CLI are exercised with stand-in data/bank modules. The paired-lift statistics and tables
are in test_ctr_table.py, the planted fixture for every variant family in test_ctr_planted.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from ctr_world import make_examples
from userip.bank.protocol import check_compatible
from userip.ctr import (
    FeatureSpec,
    Field,
    TestPredictions,
    activity_buckets,
    build_model,
    cold_users,
    known_backbones,
    label_rate,
    load_model,
    permute_ids,
    quantile_buckets,
    run_ctr_table,
)
from userip.ctr.layers import EmbeddingLayer
from userip.errors import UseripError

BACKBONES = ["dcn", "deepfm", "dcnv2", "autoint", "din"]
FAST = {"batch_size": 256, "lr": 1e-2, "max_epochs": 12, "progress": False, "bootstrap": 100}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def learnable():
    return make_examples(seed=0)


@pytest.fixture(scope="module")
def planted():
    return make_examples(n_users=400, planted=True, seed=1)


def _run(splits, group, activity, **kw):
    tr, va, te = splits
    args = {"ids": group[:, None], "id_sizes": [4], "activity": activity, **FAST}
    return run_ctr_table(tr, va, te, **{**args, **kw})


# ------------------------------------------------------------------ backbones
@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_backbone_beats_constant(learnable, backbone):
    splits, group, activity = learnable
    df = _run(splits, group, activity, backbones=[backbone], seeds=[0], variants=["base"],
              settings=["with_user_id"])
    row = df[df["slice"] == "all"].iloc[0]
    assert row["auc"] > 0.6, row.to_dict()
    assert row["epochs"] >= 1 and math.isfinite(row["logloss"])


def test_registry_and_constructor_signature():
    assert set(BACKBONES) <= set(known_backbones())
    spec = FeatureSpec([
        Field("user", "categorical", vocab=5), Field("item", "categorical", vocab=7),
        Field("genres", "bag", vocab=4), Field("history", "sequence", share="item"),
        Field("theta", "dense", dim=6),
    ])
    x = {"user": torch.tensor([1, 2, 0]), "item": torch.tensor([3, 0, 6]),
         "genres": torch.tensor([[1, 2], [0, 0], [3, 0]]), "history": torch.tensor([[1, 2], [0, 0], [0, 6]]),
         "theta": torch.randn(3, 6)}
    for name in BACKBONES:
        model = build_model(name, spec, embedding_dim=4)
        assert model(x).shape == (3,), name
    with pytest.raises(UseripError, match="known: .*dcn"):
        build_model("nope", spec)
    with pytest.raises(UseripError, match="no hyper-parameter"):
        build_model("dcn", spec, num_heads=3)
    with pytest.raises(UseripError, match="sequence field"):
        build_model("din", FeatureSpec([Field("item", "categorical", vocab=7)]))


def test_bag_mean_pools_and_ignores_padding():
    spec = FeatureSpec([Field("genres", "bag", vocab=4)])
    emb = EmbeddingLayer(spec, 3)
    w = emb.tables["genres"].weight
    out = emb({"genres": torch.tensor([[1, 3, 0, 0], [0, 0, 0, 0]])})
    assert torch.allclose(out[0, 0], (w[1] + w[3]) / 2)
    assert torch.allclose(out[1, 0], torch.zeros(3))


# ------------------------------------------------------------------ the variants
def test_planted_signal_ids_lift_and_permuted_does_not(planted):
    splits, group, activity = planted
    df = _run(splits, group, activity, backbones=["dcn"], seeds=[0, 1], settings=["no_user_id"],
              variants=["base", "+ids", "+ids-permuted"], max_epochs=20)
    auc = df[df["slice"] == "all"].groupby("variant")["auc"].mean()
    assert auc["+ids"] > auc["base"] + 0.1, auc.to_dict()
    assert abs(auc["+ids-permuted"] - auc["base"]) < 0.05, auc.to_dict()
    lifts = df.attrs["lifts"]
    v = lifts[lifts["slice"] == "all"].set_index(["variant", "control"])
    assert v.loc[("+ids", "base"), "d_auc"] > 0.1 and v.loc[("+ids", "+ids-permuted"), "d_auc"] > 0.1
    assert v.loc[("+ids", "+ids-permuted"), "verdict"] == "lift"
    assert v.loc[("+ids-permuted", "base"), "verdict"] == "no lift"


def test_extra_feature_sources_are_variants_in_the_same_harness(planted):
    """Baselines enter the table as variants: a source holding the planted group lifts, noise does not."""
    splits, group, activity = planted
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(len(group), 4)).astype(np.float32)
    df = _run(splits, group, activity, backbones=["dcn"], seeds=[0], settings=["no_user_id"],
              variants=["base", "+group-ids", "+noise-dense"], max_epochs=20,
              extra_ids={"+group-ids": (group.reshape(-1, 1), [int(group.max())])},
              extra_dense={"+noise-dense": noise})
    auc = df[df["slice"] == "all"].set_index("variant")["auc"]
    assert auc["+group-ids"] > auc["base"] + 0.1, auc.to_dict()
    assert abs(auc["+noise-dense"] - auc["base"]) < 0.05, auc.to_dict()


def test_permutation_is_label_blind_and_keeps_the_tuples():
    rng = np.random.default_rng(0)
    ids = np.r_[[[0, 0]], np.stack([rng.integers(1, 5, 50), rng.integers(1, 4, 50)], axis=1)]
    p = permute_ids(ids, seed=3)
    assert (p[0] == 0).all()
    assert sorted(map(tuple, p[1:])) == sorted(map(tuple, ids[1:]))  # same multiset of ID tuples
    assert not np.array_equal(p, ids)
    assert np.array_equal(p, permute_ids(ids, seed=3)) and not np.array_equal(p, permute_ids(ids, seed=4))
    # it depends on nothing but (ids, seed): labels cannot enter
    assert list(__import__("inspect").signature(permute_ids).parameters) == ["ids", "seed"]
    # vectors are permuted as whole rows (the +theta / +*-dense twins), with the same permutation as ID tuples
    vec = rng.normal(size=(51, 3))
    pv = permute_ids(vec, seed=3)
    order = [int(np.flatnonzero((vec == row).all(1))[0]) for row in pv]
    assert order[0] == 0 and sorted(order) == list(range(51)) and order != list(range(51))
    assert all((ids[o] == p[i]).all() for i, o in enumerate(order))


def test_activity_buckets_and_cold_users():
    act = np.r_[0, np.arange(1, 101)]
    b, k = activity_buckets(act, 4)
    assert k == 4 and b[0] == 0 and set(b[1:]) == {1, 2, 3, 4}
    assert np.all(np.diff(b[1:]) >= 0)  # monotone in the count
    b, k = activity_buckets(np.r_[0, [5] * 10 + [9] * 10], 12)  # capped by distinct counts
    assert k == 2 and set(b[1:]) <= {1, 2}
    cold, thr = cold_users(act)
    assert not cold[0] and cold[1:].sum() == 25 and thr == pytest.approx(25.75)


def test_label_rate_buckets_use_train_rows_only_and_the_id_cardinality():
    users = np.array([1, 1, 2, 2, 2, 3, 5])
    labels = np.array([1, 0, 1, 1, 1, 0, 1.0])
    rate = label_rate(users, labels, 7)
    np.testing.assert_allclose(rate[[1, 2, 3, 5]], [0.5, 1.0, 0.0, 1.0])
    assert np.isnan(rate[[0, 4, 6]]).all()  # row 0 and users without train rows: unknown
    b, k = quantile_buckets(rate, 12)
    assert k == 3 and b[0] == 0 and b[4] == 0 and b[6] == 0  # capped by the distinct rates; unknown -> 0
    assert b[3] < b[1] < b[2] == b[5]  # monotone in the rate
    b, k = quantile_buckets(np.r_[np.nan, np.linspace(1, 5, 200)], 12)
    assert k == 12 and sorted(set(b[1:])) == list(range(1, 13))


def test_label_rate_source_reads_only_the_train_split(learnable):
    """The +label-rate field comes from train labels: changing every val/test label changes no bucket."""
    splits, group, activity = learnable
    tr, va, te = splits
    kw = {"backbones": ["dcn"], "seeds": [0], "settings": ["no_user_id"], "variants": ["+label-rate"],
          "max_epochs": 1}
    captured = []
    import userip.ctr.sources as ctr_sources

    orig = ctr_sources.quantile_buckets

    def spy(values, n):
        out = orig(values, n)
        captured.append(out[0].copy())
        return out

    flipped = [SimpleNamespace(**{**vars(s), "label": 1 - s.label}) for s in (va, te)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ctr_sources, "quantile_buckets", spy)
        _run(splits, group, activity, **kw)
        _run((tr, *flipped), group, activity, **kw)
    assert len(captured) == 4  # activity and label-rate, twice
    np.testing.assert_array_equal(captured[1], captured[3])
    want, _ = orig(label_rate(tr.user, tr.label, len(group)), 4)  # id_sizes [4]: 4 buckets, as +activity
    np.testing.assert_array_equal(captured[1], want)


def test_deterministic_given_seed(learnable):
    splits, group, activity = learnable
    kw = {"backbones": ["dcn"], "variants": ["+ids-permuted"], "settings": ["no_user_id"], "max_epochs": 3}
    a = _run(splits, group, activity, seeds=[7], **kw)
    b = _run(splits, group, activity, seeds=[7], **kw)
    c = _run(splits, group, activity, seeds=[8], **kw)
    assert a["auc"].tolist() == b["auc"].tolist() and a["logloss"].tolist() == b["logloss"].tolist()
    assert a["auc"].tolist() != c["auc"].tolist()


def test_variant_lists_and_results_files(learnable, tmp_path):
    splits, group, activity = learnable
    theta = np.random.default_rng(0).normal(size=(len(group), 2, 3, 4)).astype(np.float32)
    theta[0] = 0
    hist = np.random.default_rng(1).normal(size=(len(group), 5)).astype(np.float32)
    kw = {"theta": theta, "backbones": ["deepfm"], "seeds": [0], "max_epochs": 2, "settings": ["with_user_id"],
          "profile_names": ["hobby"], "extra_dense": {"+hist-dense": hist}, "bootstrap": 50}
    df = _run(splits, group, activity, out=tmp_path, **kw)  # default: the headline variants
    assert list(dict.fromkeys(df["variant"])) == ["base", "+ids", "+ids-permuted", "+activity", "+label-rate",
                                                  "+ids+label-rate", "+hist-dense", "+hist-dense-permuted"]
    assert set(df["slice"]) == {"all", "cold"}
    assert list(df.columns[:5]) == ["backbone", "variant", "setting", "seed", "slice"]
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["runs"]) == len(df) and len(res["fits"]) == 8
    assert res["comparisons"] == len(res["lifts"]) > 0 and res["summary"]
    md = (tmp_path / "results.md").read_text()
    assert md.index("## Headline: with_user_id") < md.index("## AUC / LogLoss")
    assert f"{len(res['lifts'])} paired comparisons" in md
    tp = TestPredictions.load(tmp_path / "predictions.npz")
    assert len(tp.preds) == 8 and set(tp.slices) == {"all", "cold"}
    np.testing.assert_array_equal(tp.label, splits[2].label)
    model = load_model(tmp_path / "models" / "deepfm.safetensors")
    assert model.ctr_extra["variant"] == "+ids" and "profile:hobby" in model.ctr_spec.names

    everything = _run(splits, group, activity, variants="all", **{**kw, "max_epochs": 1})
    assert set(everything["variant"]) == {
        "base", "+ids", "+ids-permuted", "+activity", "+label-rate", "+ids+label-rate", "+ids-permuted+label-rate",
        "+theta", "+theta-permuted", "+hist-dense", "+hist-dense-permuted"}


def test_twin_has_the_same_fields_and_permuted_rows(learnable, monkeypatch):
    """A twin is the same model on other rows: same spec, and each user reads another user's vector."""
    import userip.ctr.run as ctr_run

    splits, group, activity = learnable
    theta = np.random.default_rng(0).normal(size=(len(group), 6)).astype(np.float32)
    seen = {}
    orig_fit = ctr_run.fit

    def spy(model, train, *a, **kw):
        seen[kw["desc"].split()[1]] = (model.ctr_spec.names, train["dense:theta"][np.arange(5)].numpy())
        return orig_fit(model, train, *a, **{**kw, "settings": dataclasses.replace(kw["settings"], max_epochs=1)})

    monkeypatch.setattr(ctr_run, "fit", spy)
    _run(splits, group, activity, theta=theta, backbones=["dcn"], seeds=[0], settings=["no_user_id"],
         variants=["+theta", "+theta-permuted"], bootstrap=20)
    (names, own), (names_p, other) = seen["+theta"], seen["+theta-permuted"]
    assert names == names_p and "dense:theta" in names
    scale = theta[1:].std()
    users = splits[0].user[:5]
    np.testing.assert_allclose(own, theta[users] / scale, rtol=1e-6)
    perm = permute_ids(theta, 0 + ctr_run.PERMUTATION_SEED_OFFSET)
    np.testing.assert_allclose(other, perm[users] / scale, rtol=1e-6)
    assert not np.allclose(own, other)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_are_clear(learnable):
    splits, group, activity = learnable
    tr, va, te = splits
    with pytest.raises(UseripError, match="unknown CTR backbone 'xgb'.*dcn"):
        _run(splits, group, activity, backbones=["xgb"])
    with pytest.raises(UseripError, match=r"ids must have shape \[n_users\+1, m\]"):
        _run(splits, group[:-5], activity[:-5], backbones=["dcn"])
    with pytest.raises(UseripError, match="ids must have shape"):
        _run(splits, group, activity, ids=group[:, None], id_sizes=[4, 4], backbones=["dcn"])
    with pytest.raises(UseripError, match=r"values must lie in 0\.\.3"):
        _run(splits, group, activity, id_sizes=[3], backbones=["dcn"])
    no_item = SimpleNamespace(**{k: v for k, v in vars(tr).items() if k != "item"})
    with pytest.raises(UseripError, match="train CTR examples: missing field 'item'"):
        run_ctr_table(no_item, va, te, ids=group[:, None], id_sizes=[4], activity=activity)
    with pytest.raises(UseripError, match="unknown variants"):
        _run(splits, group, activity, variants=["+magic"])
    with pytest.raises(UseripError, match=r"unknown settings \['bth'\]; known: with_user_id, no_user_id"):
        _run(splits, group, activity, settings="bth")
    with pytest.raises(UseripError, match=r"'\+theta' needs theta"):
        _run(splits, group, activity, variants=["+theta"])
    with pytest.raises(UseripError, match=r"unknown variants \['\+activity-permuted'\]"):
        _run(splits, group, activity, variants=["+activity-permuted"])  # a control has no twin
    with pytest.raises(UseripError, match="extra source 'hist'"):
        _run(splits, group, activity, extra_dense={"hist": np.zeros((len(group), 2))})
    with pytest.raises(UseripError, match="NaN"):
        _run(splits, group, activity, extra_dense={"+hist-dense": np.full((len(group), 2), np.nan)})
    with pytest.raises(UseripError, match=r"competitor '\+text-ids' is not a built source"):
        _run(splits, group, activity, competitor="+text-ids")


# ------------------------------------------------------------------ train_ctr + CLI with stand-in stages
class _FakeBank:
    def __init__(self, table, fingerprint):
        self.table, self.fp = table, fingerprint
        self.profile_names = ["hobby"]
        self.closed = False

    def meta(self):
        return {"data_fingerprint": self.fp, "profiles": [{"name": "hobby", "size": 4}]}

    def get(self, user_ids):
        return np.array([[self.table.get(u, 0)] for u in user_ids], dtype=np.int64)

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def fake_stages(learnable, monkeypatch):
    (tr, va, te), group, _ = learnable
    n_users = len(group) - 1
    data = SimpleNamespace(
        fingerprint="fp-data", n_users=n_users,
        users=pd.DataFrame(
            {"user_idx": np.arange(1, n_users + 1), "user_id": [f"u{i}" for i in range(1, n_users + 1)]}
        ),
    )
    ex = {"train": tr, "val": va, "test": te}
    data_mod = types.ModuleType("userip.data")
    data_mod.load_prepared = lambda path: data
    data_mod.ctr_examples = lambda d, split, history_len=20: ex[split]
    bank_state = {"fp": "fp-data", "opened": []}

    def open_bank(url):
        bank_state["opened"].append(_FakeBank({f"u{i}": int(group[i]) for i in range(1, n_users + 1)},
                                              bank_state["fp"]))
        return bank_state["opened"][-1]

    bank_mod = types.ModuleType("userip.bank")
    bank_mod.check_compatible = check_compatible
    bank_mod.open_bank = open_bank
    monkeypatch.setitem(sys.modules, "userip.data", data_mod)
    monkeypatch.setitem(sys.modules, "userip.bank", bank_mod)
    return bank_state


def test_train_ctr_writes_results_and_checks_fingerprint(fake_stages, tmp_path):
    from userip.ctr import train_ctr

    df = train_ctr("DATA", "BANK", backbones="dcn", seeds=1, out=tmp_path, settings="with_user_id",
                   variants="base,+ids", max_epochs=2, batch_size=512, progress=False)
    assert set(df["variant"]) == {"base", "+ids"}
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
    meta = json.loads((tmp_path / "models" / "dcn.json").read_text())
    assert meta["backbone"] == "dcn" and meta["variant"] == "+ids" and meta["id_sizes"] == [4]
    fake_stages["fp"] = "fp-other"
    with pytest.raises(UseripError, match="fp-other.*fp-data"):
        train_ctr("DATA", "BANK", backbones="dcn", seeds=1, out=tmp_path)
    assert len(fake_stages["opened"]) == 2 and all(b.closed for b in fake_stages["opened"])  # closed, refused too


def test_train_ctr_reads_personal_tokens(fake_stages, learnable, tmp_path):
    from safetensors.numpy import save_file

    from userip.ctr import train_ctr

    n_rows = len(learnable[1])
    prof = tmp_path / "profiles"
    prof.mkdir()
    personal = np.random.default_rng(0).normal(size=(n_rows, 2, 2, 3)).astype(np.float32)
    save_file({"theta": personal + 1, "personal": personal}, str(prof / "profiles.safetensors"))
    (prof / "config.yaml").write_text("data_fingerprint: fp-data\n")
    kw = {"backbones": "deepfm", "seeds": [3], "settings": "no_user_id", "max_epochs": 1, "progress": False,
          "variants": "+theta,+theta-permuted", "bootstrap": 20}
    df = train_ctr("DATA", "BANK", prof, out=tmp_path / "out", **kw)
    assert set(df["variant"]) == {"+theta", "+theta-permuted"}
    (prof / "config.yaml").write_text("data_fingerprint: fp-else\n")
    with pytest.raises(UseripError, match="fp-else.*fp-data"):
        train_ctr("DATA", "BANK", prof, out=tmp_path / "out", **kw)
    # profiles with a split-and-label fingerprint on data prepared before it: the message says which to rebuild
    (prof / "config.yaml").write_text("data_fingerprint: v2:abc\n")
    with pytest.raises(UseripError, match="older userip.*re-prepare"):
        train_ctr("DATA", "BANK", prof, out=tmp_path / "out", **kw)


def test_a_killed_train_ctr_continues_even_when_told_to_overwrite(fake_stages, monkeypatch, tmp_path):
    """`userip run` calls train_ctr with overwrite=True: a table killed in its second backbone must keep the first
    one's finished fits (not clear them before they can be taken over); a finished table is still replaced."""
    import userip.ctr.run as ctr_run
    from userip.ctr import train_ctr

    kw = dict(backbones="dcn,deepfm", seeds=1, out=tmp_path, settings="no_user_id", variants="base,+ids",
              max_epochs=1, batch_size=512, progress=False, bootstrap=20, overwrite=True)
    orig_fit = ctr_run.fit
    _die_in_deepfm(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_ctr("DATA", "BANK", **kw)
    fitted: list[str] = []

    def counting(model, *a, **k):
        fitted.append(k["desc"].split()[0])
        return orig_fit(model, *a, **k)

    monkeypatch.setattr(ctr_run, "fit", counting)
    df = train_ctr("DATA", "BANK", **kw)
    assert fitted == ["deepfm", "deepfm"], "the finished dcn fits were taken over"
    assert set(df["backbone"]) == {"dcn", "deepfm"}
    fitted.clear()
    train_ctr("DATA", "BANK", **kw)  # finished: overwrite replaces it, every fit again
    assert sorted(set(fitted)) == ["dcn", "deepfm"] and len(fitted) == 4


def test_cli_ctr_train(fake_stages, tmp_path):
    from typer.testing import CliRunner

    from userip.cli import app

    args = ["ctr", "train", "--data", "D", "--bank", "B", "--backbones", "dcn", "--seeds", "1", "--out",
            str(tmp_path), "--variants", "base,+ids", "--settings", "both", "--max-epochs", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "+ids vs base" in r.output
    assert "Headline: with_user_id" in r.output and "Headline: no_user_id" in r.output  # "both", as --help says
    r = CliRunner().invoke(app, [*args[:7], "nope", *args[8:]])
    assert r.exit_code == 2 and "unknown CTR backbone" in r.output


def _die_in_deepfm(monkeypatch) -> None:
    """Kill the table (as Ctrl-C would) at its first DeepFM fit."""
    import userip.ctr.run as ctr_run

    orig_fit = ctr_run.fit

    def dies(model, *a, **kw):
        if kw["desc"].startswith("deepfm"):
            raise KeyboardInterrupt
        return orig_fit(model, *a, **kw)

    monkeypatch.setattr(ctr_run, "fit", dies)


def test_a_killed_table_keeps_the_finished_backbones_predictions(learnable, monkeypatch, tmp_path):
    """results.json and predictions.npz are rewritten after every backbone, so the lifts of what finished can be
    computed from a table killed inside a later backbone."""
    from userip.ctr.table import TestPredictions, lift_frame

    splits, group, activity = learnable
    _die_in_deepfm(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(splits, group, activity, backbones=["dcn", "deepfm"], seeds=[0, 1], settings=["no_user_id"],
             variants=["base", "+ids", "+ids-permuted"], bootstrap=20, out=tmp_path, progress=False)
    kept = TestPredictions.load(tmp_path / "predictions.npz")
    assert {k[0] for k in kept.preds} == {"dcn"} and len(kept.preds) == 3 * 2
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {r["backbone"] for r in runs} == {"dcn"} and len(runs) == 3 * 2 * 2  # x 2 slices
    lifts = lift_frame(kept, n_boot=20, seed=0)
    assert set(lifts["backbone"]) == {"dcn"} and len(lifts) > 0


def test_a_rerun_takes_over_the_finished_backbones_and_matches_an_uninterrupted_table(learnable, monkeypatch,
                                                                                       tmp_path):
    """Run again on the killed table's OUT: the finished backbone is not refit (same inputs, same key) and the
    table equals one that was never killed; changed inputs (another ID table) refit everything."""
    import userip.ctr.run as ctr_run

    splits, group, activity = learnable
    kw = dict(backbones=["dcn", "deepfm"], seeds=[0, 1], settings=["no_user_id"],
              variants=["base", "+ids", "+ids-permuted"], bootstrap=20, progress=False)
    whole = _run(splits, group, activity, out=tmp_path / "whole", **kw)
    orig_fit = ctr_run.fit
    fitted: list[str] = []
    _die_in_deepfm(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(splits, group, activity, out=tmp_path / "killed", **kw)

    def counting(model, *a, **k):
        fitted.append(k["desc"].split()[0])
        return orig_fit(model, *a, **k)

    monkeypatch.setattr(ctr_run, "fit", counting)
    again = _run(splits, group, activity, out=tmp_path / "killed", **kw)
    assert set(fitted) == {"deepfm"} and len(fitted) == 3 * 2
    cols = ["backbone", "variant", "setting", "seed", "slice", "auc", "logloss"]
    pd.testing.assert_frame_equal(again[cols], whole[cols])
    lifts = again.attrs["lifts"]
    pd.testing.assert_frame_equal(lifts, whole.attrs["lifts"])
    fitted.clear()
    other = group.copy()
    other[1:] = (other[1:] + 1) % 4  # another ID table: nothing of the old table may be reused
    _run(splits, other, activity, out=tmp_path / "killed", **kw)
    assert set(fitted) == {"dcn", "deepfm"} and len(fitted) == 3 * 2 * 2
