"""`userip export fuxictr`: the run's CTR split with profile IDs, read and trained on by the real FuxiCTR library.

A tiny run (data -> profiles -> bank with the tiny random LLM, ~5 s) is exported through the CLI; the rows must be
the CTR stage's rows and the profile columns the bank's IDs. Then FuxiCTR's own data path (FeatureProcessor,
build_dataset to parquet via Ray, RankDataLoader) feeds a DeepFM for one epoch and its test AUC is read.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from userip.cli import app
from userip.data.synthetic import write_taste_world


@pytest.fixture
def tiny_run(tmp_path, monkeypatch, tiny_model_dir):
    """A run directory with data/, profiles/ and bank.sqlite (the stages an export reads), tiny LLM, 16 users."""
    from userip.run import run

    monkeypatch.setenv("USERIP_CACHE_DIR", str(tmp_path / "cache"))
    w = write_taste_world(tmp_path / "world")
    cfg = {
        "seed": 0,
        "users": 16,
        "model": str(tiny_model_dir),
        "data": {"interactions": str(w / "inter.csv"), "items": str(w / "items.csv"), "users": str(w / "users.csv"),
                 "side_features": ["age", "gender", "occupation"], "bins": {"age": [25, 35, 45]}},
        "profile": {"epochs": 1, "batch_users": 8, "max_tokens": 48, "inner_steps": 1, "eval_users": 8},
        "ctr": {"lr": 0.01, "batch_size": 64},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    run(tmp_path / "run.yaml", out, stages=("data", "profiles", "bank"), progress=False)
    return out


@pytest.fixture
def local_ray(monkeypatch):
    """Ray for FuxiCTR's data path, started here on one CPU without dashboard (FuxiCTR's own init would take
    every core next to other jobs); shut down after the test so no Ray processes outlive it."""
    import ray

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats report from a test
    # Ray gives its raylet a fixed 30 s to register; on a loaded 2-core machine (a fit running beside the suite)
    # that window can pass, so a failed start is retried on a fresh node before the test gives up
    for attempt in range(3):
        try:
            ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


def _deepfm_class():
    """DeepFM assembled from FuxiCTR's own blocks (LR + FM + MLP over its feature embeddings): the PyPI package
    ships the library, not the model_zoo, whose DeepFM the exported model_config.yaml names."""
    from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    class DeepFM(BaseModel):
        def __init__(self, feature_map, model_id="DeepFM", gpu=-1, learning_rate=1e-3, embedding_dim=8,
                     hidden_units=(16, 16), hidden_activations="ReLU", net_dropout=0.0, batch_norm=False,
                     embedding_regularizer=None, net_regularizer=None, **kwargs):
            super().__init__(feature_map, model_id=model_id, gpu=gpu, embedding_regularizer=embedding_regularizer,
                             net_regularizer=net_regularizer, **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.fm = FactorizationMachine(feature_map)
            self.mlp = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1,
                                 hidden_units=list(hidden_units), hidden_activations=hidden_activations,
                                 output_activation=None, dropout_rates=net_dropout, batch_norm=batch_norm)
            self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            x = self.get_inputs(inputs)
            emb = self.embedding_layer(x)
            logit = self.fm(x, emb) + self.mlp(emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(logit)}

    return DeepFM


def test_export_matches_ctr_split_and_trains_a_fuxictr_deepfm(tiny_run, tmp_path, local_ray):
    from userip.bank import open_bank
    from userip.data import ctr_examples, load_prepared

    out = tmp_path / "fuxictr"
    r = CliRunner().invoke(app, ["export", "fuxictr", "--run", str(tiny_run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    info = yaml.safe_load((out / "export.json").read_text())
    assert info["experiment_ids"] == ["DeepFM_base", "DeepFM_ids", "DCN_base", "DCN_ids"]

    # the rows are the CTR stage's rows: same split, order, users, items, labels; the IDs are the bank's
    data = load_prepared(tiny_run / "data")
    with open_bank(tiny_run / "bank.sqlite") as bank:
        names = bank.profile_names
        bank_ids = dict(zip(data.users["user_id"], bank.get(list(data.users["user_id"])), strict=True))
    assert names
    for split, fname in (("train", "train.csv"), ("val", "valid.csv"), ("test", "test.csv")):
        ex = ctr_examples(data, split, history_len=info["history_len"])
        df = pd.read_csv(out / fname, dtype={"user_id": str, "item_id": str})
        assert len(df) == len(ex) == info["rows"][fname] > 0, split
        assert df["user_id"].tolist() == data.user_ids(ex.user)
        assert df["item_id"].tolist() == data.item_ids(ex.item)
        assert np.array_equal(df["label"].to_numpy(), ex.label.astype(int))
        want = np.stack([bank_ids[u] for u in df["user_id"]])
        assert np.array_equal(df[[f"profile_{n}" for n in names]].to_numpy(), want), split
        assert df["age"].isin(["[-inf, 25)", "[25, 35)", "[35, 45)", "[45, inf)"]).all()  # our buckets, named
    # the same history field the backbones read: earlier items, most recent last
    train = pd.read_csv(out / "train.csv", dtype=str, keep_default_na=False)
    u0 = train[train["user_id"] == train["user_id"].iloc[0]]
    assert u0["history"].iloc[2].split("^") == u0["item_id"].iloc[:2].tolist()

    # the configs are FuxiCTR's: its loader reads both experiments; only _ids reads the profile fields
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import FeatureProcessor, build_dataset
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything
    from fuxictr.utils import load_config

    base = load_config(str(out), "DeepFM_base")
    active = {n for c in base["feature_cols"] if c["active"] for n in np.atleast_1d(c["name"])}
    assert not any(n.startswith("profile_") for n in active) and "item_id" in active

    params = load_config(str(out), "DeepFM_ids")
    params.update(epochs=1, verbose=0, batch_size=64)  # one epoch, quiet; the rest as exported
    seed_everything(seed=params["seed"])
    encoder = FeatureProcessor(**params)
    params["train_data"], params["valid_data"], params["test_data"] = build_dataset(encoder, **params)
    data_dir = os.path.join(params["data_root"], params["dataset_id"])
    feature_map = FeatureMap(params["dataset_id"], data_dir)
    feature_map.load(os.path.join(data_dir, "feature_map.json"), params)
    for j, n in enumerate(names):  # every ID seen in train got a token (+ padding and OOV)
        spec = feature_map.features[f"profile_{n}"]
        assert spec["type"] == "categorical"
        assert spec["vocab_size"] == len(set(train[f"profile_{n}"])) + 2, (n, j)
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train", **params)
    assert train_gen.num_samples == info["rows"]["train.csv"]
    os.makedirs(os.path.join(params["model_root"], params["dataset_id"]), exist_ok=True)
    model = _deepfm_class()(feature_map, **params)
    model.fit(train_gen, validation_data=valid_gen, epochs=1)
    test_gen = RankDataLoader(feature_map, stage="test", **params)
    logs = model.evaluate(test_gen)
    print(f"FuxiCTR DeepFM_ids, 1 epoch: test {logs}")
    assert math.isfinite(logs["AUC"]) and 0.0 <= logs["AUC"] <= 1.0
    # one epoch leaves a model near the train base rate (0.38 here; test's is 0.62, so ~0.8 is expected); a
    # logloss far above that means saturated predictions, as a history field sharing item_id's table gave
    # (FuxiCTR's LR layer left that table at N(0, 1) init: test logloss 1.9, AUC exactly 0.5)
    assert math.isfinite(logs["logloss"]) and 0 < logs["logloss"] < 1.2
    pred = model.predict(test_gen)
    assert len(pred) == info["rows"]["test.csv"] and np.isfinite(pred).all() and pred.std() > 0


def test_export_errors_name_the_missing_file(tmp_path, tiny_run):
    runner = CliRunner()
    r = runner.invoke(app, ["export", "fuxictr", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "nope: not found" in r.output, r.output

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    r = runner.invoke(app, ["export", "fuxictr", "--run", str(not_a_run), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "data: not found" in r.output, r.output

    (tiny_run / "bank.sqlite").rename(tmp_path / "moved.sqlite")
    r = runner.invoke(app, ["export", "fuxictr", "--run", str(tiny_run), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "bank.sqlite: not found" in r.output, r.output
    assert not (tmp_path / "o").exists()  # nothing written before the inputs check out

    # the bank the run built, given where it now lives; a folder of someone else's files is refused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    args = ["export", "fuxictr", "--run", str(tiny_run), "--bank", str(tmp_path / "moved.sqlite")]
    r = runner.invoke(app, [*args, "--out", str(foreign), "--overwrite"])
    assert r.exit_code == 2 and "did not write" in r.output and (foreign / "notes.txt").read_text() == "keep me"
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--overwrite"])
    assert r.exit_code == 0, r.output
