"""CTR stage: backbones, trainer, variants, the paired-lift table, and the train_ctr/CLI wiring.

Everything runs on small synthetic example sets built here (no userip.data / userip.bank needed);
train_ctr and the CLI are exercised with stand-in data/bank modules.
"""

from __future__ import annotations

import json
import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from userip.ctr import (
    FeatureSpec,
    Field,
    activity_buckets,
    build_model,
    cold_users,
    known_backbones,
    lift_frame,
    load_model,
    paired_interval,
    permute_ids,
    results_markdown,
    run_ctr_table,
)
from userip.ctr.layers import EmbeddingLayer
from userip.errors import UseripError

BACKBONES = ["dcn", "deepfm", "dcnv2", "autoint", "din"]
FAST = {"batch_size": 256, "lr": 1e-2, "max_epochs": 12, "progress": False}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_examples(n_users=200, n_items=100, rows_per_user=20, *, planted=False, seed=0, hist_len=5):
    """(train, val, test) SimpleNamespaces with the CTRExamples fields, the hidden group per user, activity.

    ``planted``: a hidden user group (1..4) decides the label (P=0.85 when the item's category matches the
    group, else 0.2) and the history is random, so without the group nothing predicts the label.
    Otherwise the label follows item and user biases and the history holds the user's earlier clicks.
    """
    rng = np.random.default_rng(seed)
    group = np.r_[0, rng.integers(1, 5, n_users)]
    cat = np.r_[0, np.arange(n_items) % 4 + 1]
    item_bias = np.r_[0, rng.normal(0, 1.2, n_items)]
    user_bias = np.r_[0, rng.normal(0, 0.7, n_users)]
    counts = np.clip((rng.pareto(1.5, n_users) * rows_per_user / 2).astype(int) + 4, 3, rows_per_user * 5)
    users, items, labels, hist = [], [], [], []
    for u in range(1, n_users + 1):
        clicked: list[int] = []
        for i in rng.integers(1, n_items + 1, counts[u - 1]):
            h = np.zeros(hist_len, dtype=np.int64)
            if planted:
                p = 0.85 if cat[i] == group[u] else 0.2
                h[:] = rng.integers(1, n_items + 1, hist_len)
            else:
                p = 1 / (1 + np.exp(-(1.5 * item_bias[i] + user_bias[u])))
                if clicked:
                    last = clicked[-hist_len:]
                    h[-len(last) :] = last
            y = float(rng.random() < p)
            if y:
                clicked.append(int(i))
            users.append(u)
            items.append(i)
            labels.append(y)
            hist.append(h)
    users, items = np.array(users, dtype=np.int64), np.array(items, dtype=np.int64)
    genres = np.stack([cat[items], np.where(items % 3 == 0, 5, 0)], axis=1)
    gender = np.r_[0, rng.integers(1, 3, n_users)]
    split = rng.choice(3, len(users), p=[0.7, 0.15, 0.15])
    vocab = {"user": n_users + 1, "item": n_items + 1, "genre": 6, "gender": 3}
    hist, labels = np.array(hist), np.array(labels, dtype=np.float32)
    out = []
    for s in range(3):
        m = split == s
        out.append(
            SimpleNamespace(
                user=users[m], item=items[m], genres=genres[m], history=hist[m],
                side={"gender": gender[users[m]]}, label=labels[m], timestamp=np.flatnonzero(m),
                vocab=dict(vocab),
            )
        )
    activity = np.bincount(out[0].user, minlength=n_users + 1)
    return tuple(out), group, activity


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
    lift = lift_frame(df[df["slice"] == "all"])
    d = lift.set_index("control")["d_auc"]
    assert d["base"] > 0.1 and d["+ids-permuted"] > 0.1


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


def test_activity_buckets_and_cold_users():
    act = np.r_[0, np.arange(1, 101)]
    b, k = activity_buckets(act, 4)
    assert k == 4 and b[0] == 0 and set(b[1:]) == {1, 2, 3, 4}
    assert np.all(np.diff(b[1:]) >= 0)  # monotone in the count
    b, k = activity_buckets(np.r_[0, [5] * 10 + [9] * 10], 12)  # capped by distinct counts
    assert k == 2 and set(b[1:]) <= {1, 2}
    cold, thr = cold_users(act)
    assert not cold[0] and cold[1:].sum() == 25 and thr == pytest.approx(25.75)


def test_deterministic_given_seed(learnable):
    splits, group, activity = learnable
    kw = {"backbones": ["dcn"], "variants": ["+ids-permuted"], "settings": ["no_user_id"], "max_epochs": 3}
    a = _run(splits, group, activity, seeds=[7], **kw)
    b = _run(splits, group, activity, seeds=[7], **kw)
    c = _run(splits, group, activity, seeds=[8], **kw)
    assert a["auc"].tolist() == b["auc"].tolist() and a["logloss"].tolist() == b["logloss"].tolist()
    assert a["auc"].tolist() != c["auc"].tolist()


def test_theta_variant_and_results_files(learnable, tmp_path):
    splits, group, activity = learnable
    theta = np.random.default_rng(0).normal(size=(len(group), 2, 3, 4)).astype(np.float32)
    theta[0] = 0
    df = _run(splits, group, activity, theta=theta, backbones=["deepfm"], seeds=[0], max_epochs=2,
              settings=["with_user_id"], out=tmp_path, profile_names=["hobby"])
    assert set(df["variant"]) == {"base", "+ids", "+ids-permuted", "+activity", "+theta"}
    assert set(df["slice"]) == {"all", "cold"}
    assert list(df.columns[:5]) == ["backbone", "variant", "setting", "seed", "slice"]
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["runs"]) == len(df) and len(res["fits"]) == 5
    assert "Paired lift" in (tmp_path / "results.md").read_text()
    model = load_model(tmp_path / "models" / "deepfm.safetensors")
    assert model.ctr_extra["variant"] == "+ids" and "profile:hobby" in model.ctr_spec.names


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
    with pytest.raises(UseripError, match=r"'\+theta' needs theta"):
        _run(splits, group, activity, variants=["+theta"])


# ------------------------------------------------------------------ the table (pure)
def _runs(diffs_all, base=0.70, backbone="dcn"):
    rows = []
    for seed, d in enumerate(diffs_all):
        for variant, auc in (("base", base), ("+ids", base + d), ("+ids-permuted", base + 0.001 * seed)):
            rows.append({"backbone": backbone, "variant": variant, "setting": "no_user_id", "seed": seed,
                         "slice": "all", "auc": auc, "logloss": 0.6 - (auc - base), "epochs": 5})
    return pd.DataFrame(rows)


def test_paired_interval_matches_t_interval():
    mean, lo, hi, n = paired_interval([0.01, 0.02, 0.03])
    assert n == 3 and mean == pytest.approx(0.02)
    assert hi - mean == pytest.approx(4.302652729911275 * 0.01 / math.sqrt(3))
    assert math.isnan(paired_interval([0.5])[1])


def test_results_markdown_paired_lift_and_no_lift():
    clear = _runs([0.05, 0.051, 0.049, 0.052, 0.05])
    lift = lift_frame(clear).set_index("control")
    assert lift.loc["base", "d_auc"] == pytest.approx(0.0504)
    assert lift.loc["base", "verdict"] == "lift" and lift.loc["base", "n"] == 5
    noisy = _runs([0.03, -0.02, 0.01, -0.03, 0.02])
    md = results_markdown(noisy)
    assert "| no lift |" in md and "+ids vs base" in md and "+ids vs +ids-permuted" in md
    assert "| dcn | no_user_id | all | base | 5 | 0.7000 ± 0.0000 |" in md
    one = results_markdown(_runs([0.05]))
    assert "| n/a |" in one and "| no lift |" not in one and "| lift |" not in one
    # pure: same frame in, same text out, input untouched
    before = noisy.copy()
    assert results_markdown(noisy) == md and noisy.equals(before)


# ------------------------------------------------------------------ train_ctr + CLI with stand-in stages
class _FakeBank:
    def __init__(self, table, fingerprint):
        self.table, self.fp = table, fingerprint
        self.profile_names = ["hobby"]

    def meta(self):
        return {"data_fingerprint": self.fp, "profiles": [{"name": "hobby", "size": 4}]}

    def get(self, user_ids):
        return np.array([[self.table.get(u, 0)] for u in user_ids], dtype=np.int64)


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
    bank_state = {"fp": "fp-data"}
    bank_mod = types.ModuleType("userip.bank")
    bank_mod.open_bank = lambda url: _FakeBank({f"u{i}": int(group[i]) for i in range(1, n_users + 1)},
                                               bank_state["fp"])
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


def test_train_ctr_reads_personal_tokens(fake_stages, learnable, tmp_path):
    from safetensors.numpy import save_file

    from userip.ctr import train_ctr

    n_rows = len(learnable[1])
    prof = tmp_path / "profiles"
    prof.mkdir()
    personal = np.random.default_rng(0).normal(size=(n_rows, 2, 2, 3)).astype(np.float32)
    save_file({"theta": personal + 1, "personal": personal}, str(prof / "profiles.safetensors"))
    (prof / "config.yaml").write_text("data_fingerprint: fp-data\n")
    kw = {"backbones": "deepfm", "seeds": [3], "settings": "no_user_id", "max_epochs": 1, "progress": False}
    df = train_ctr("DATA", "BANK", prof, out=tmp_path / "out", **kw)
    assert "+theta" in set(df["variant"])
    (prof / "config.yaml").write_text("data_fingerprint: fp-else\n")
    with pytest.raises(UseripError, match="fp-else.*fp-data"):
        train_ctr("DATA", "BANK", prof, out=tmp_path / "out", **kw)


def test_cli_ctr_train(fake_stages, tmp_path):
    from typer.testing import CliRunner

    from userip.cli import app

    args = ["ctr", "train", "--data", "D", "--bank", "B", "--backbones", "dcn", "--seeds", "2", "--out",
            str(tmp_path), "--variants", "base,+ids", "--settings", "no_user_id", "--max-epochs", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "+ids vs base" in r.output
    r = CliRunner().invoke(app, [*args[:7], "nope", *args[8:]])
    assert r.exit_code == 2 and "unknown CTR backbone" in r.output
