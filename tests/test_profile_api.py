"""The profile stage end to end: prepared data -> PROFILES dir (contract files), CLI, and a real-LLM run."""

import json

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from userip.cli import app
from userip.llm import tiny_llm
from userip.profile import fit_profiles, id_counts

FAST = dict(epochs=2, batch_users=4, inner_steps=2, max_tokens=32, windows_per_user=2)


def test_fit_writes_the_profiles_contract(prepared, tmp_path):
    out = tmp_path / "profiles"
    metrics = fit_profiles(prepared.path, out, llm=tiny_llm(), progress=False, **FAST)
    for f in ("profiles.safetensors", "codebooks.safetensors", "profile_ids.parquet", "config.yaml",
              "metrics.json", "checkpoints/last.json", "checkpoints/epoch0002.rank0-of-1.safetensors"):
        assert (out / f).exists(), f
    ids = pd.read_parquet(out / "profile_ids.parquet")
    assert list(ids.columns) == ["user_id", "user_idx", "hobby", "background"]
    trained = prepared.interactions.query("split == 'train'")["user_idx"].unique()
    assert sorted(ids["user_idx"]) == sorted(trained)
    assert ids["user_id"].tolist() == prepared.user_ids(ids["user_idx"].to_numpy())
    assert ids["hobby"].between(1, 4).all() and ids["background"].between(1, 3).all()
    t = load_file(out / "profiles.safetensors")
    assert t["theta"].shape == (prepared.n_users + 1, 2, 1, 32)
    assert float(t["theta"][0].abs().sum()) == 0.0
    cb = load_file(out / "codebooks.safetensors")
    assert cb["codebook.hobby"].shape == (4, 32) and cb["codebook.background"].shape == (3, 32)
    conf = yaml.safe_load((out / "config.yaml").read_text())
    assert conf["data_fingerprint"] == prepared.fingerprint
    assert [p["name"] for p in conf["profiles"]] == ["hobby", "background"]
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["epochs"]) == 2 and saved == json.loads(json.dumps(metrics))
    assert "gap_own_vs_mean" in saved["epochs"][-1]
    assert not any(p.suffix == ".gguf" or "model" in p.name for p in out.rglob("*") if p.is_file())


def test_same_seed_same_ids(prepared, tmp_path):
    a = fit_profiles(prepared.path, tmp_path / "a", llm=tiny_llm(), progress=False, seed=3, **FAST)
    b = fit_profiles(prepared.path, tmp_path / "b", llm=tiny_llm(), progress=False, seed=3, **FAST)
    ia = pd.read_parquet(tmp_path / "a" / "profile_ids.parquet")
    ib = pd.read_parquet(tmp_path / "b" / "profile_ids.parquet")
    pd.testing.assert_frame_equal(ia, ib)
    assert a["epochs"][-1]["train_nll"] == b["epochs"][-1]["train_nll"]


def test_cli_fit_and_ids(prepared, tmp_path, tiny_model_dir):
    out = tmp_path / "p"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"profile": {k: v for k, v in FAST.items() if k != "epochs"}}))
    r = CliRunner().invoke(app, ["profile", "fit", "--data", str(prepared.path), "--out", str(out), "--model",
                                 str(tiny_model_dir), "--config", str(cfg), "--epochs", "1", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "best epoch" in r.output
    r = CliRunner().invoke(app, ["profile", "ids", str(out)])
    assert r.exit_code == 0 and "hobby" in r.output and "background" in r.output
    counts = id_counts(out)
    assert sum(counts["hobby"].values()) == len(pd.read_parquet(out / "profile_ids.parquet"))
    # a refit through the CLI keeps the first fit's IDs where it can and says how many changed
    r = CliRunner().invoke(app, ["profile", "fit", "--data", str(prepared.path), "--out", str(tmp_path / "p2"),
                                 "--model", str(tiny_model_dir), "--config", str(cfg), "--epochs", "1",
                                 "--seed", "2", "--previous", str(out)])
    assert r.exit_code == 0, r.output
    refit = json.loads((tmp_path / "p2" / "metrics.json").read_text())["refit"]
    assert set(refit["profiles"]) == {"hobby", "background"}
    assert all(v["changed"] <= v["changed_raw"] for v in refit["profiles"].values())


def test_cli_reports_bad_input_without_traceback(tmp_path):
    r = CliRunner().invoke(app, ["profile", "fit", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                                 "--model", "some-org/some-hub-model"])
    assert r.exit_code == 2
    assert "error" in r.output and "Traceback" not in r.output


@pytest.mark.integration
def test_real_smollm2_one_epoch_on_real_ml100k(tmp_path):
    from userip.data import prepare

    data = prepare(tmp_path / "data", dataset="ml-100k")
    m = fit_profiles(data.path, tmp_path / "p", model="smollm2-135m", progress=False, epochs=1, max_users=16,
                     batch_users=16, inner_steps=2, windows_per_user=2, max_tokens=48, micro_batch=8)
    ep = m["epochs"][0]
    assert m["n_users"] == 16
    assert 0.5 < ep["train_nll"] < 6.0 and 0.5 < ep["heldout"]["own"] < 6.0
    ids = pd.read_parquet(tmp_path / "p" / "profile_ids.parquet")
    assert len(ids) == 16 and ids["hobby"].between(1, 4).all()


def test_cli_infer_new_users_and_upsert_into_the_bank(prepared, tmp_path, tiny_model_dir):
    from userip.bank import build_bank, open_bank

    out = tmp_path / "p"
    fit_profiles(prepared.path, out, model=str(tiny_model_dir), progress=False, max_users=5, dtype="fp32", **FAST)
    fitted = set(pd.read_parquet(out / "profile_ids.parquet")["user_id"])
    trained = prepared.interactions.query("split == 'train'")["user_idx"].unique()
    new = [u for u in prepared.user_ids(trained) if u not in fitted][:2]
    assert len(new) == 2
    build_bank(out, tmp_path / "bank.sqlite")
    assert (open_bank(tmp_path / "bank.sqlite").get(new) == 0).all()
    r = CliRunner().invoke(app, ["profile", "infer", "--run", str(out), "--data", str(prepared.path),
                                 "--users", " ".join(new), "--bank", str(tmp_path / "bank.sqlite")])
    assert r.exit_code == 0, r.output
    got = open_bank(tmp_path / "bank.sqlite").get(new)
    assert (got[:, 0] >= 1).all() and (got[:, 0] <= 4).all() and (got[:, 1] >= 1).all()
    assert len(open_bank(tmp_path / "bank.sqlite").to_frame()) == len(fitted) + 2
    r = CliRunner().invoke(app, ["profile", "infer", "--run", str(out), "--data", str(prepared.path),
                                 "--users", "no-such-user"])
    assert r.exit_code == 2 and "unknown user ids" in r.output


def test_ceiling_context_uses_the_template_lead_in_or_the_configured_one(prepared):
    from userip.llm import tiny_llm
    from userip.profile import ProfileConfig
    from userip.profile.api import build_corpus, lead_in

    tok = tiny_llm(seed=0).tokenizer
    template = "The user's hobby is {hobby}. The user's background is {background}. The user watched: {behaviour}"
    assert lead_in(template) == "The user watched:"
    inline = "The user watched these movies (hobby: {hobby}; background: {background}): {behaviour}"
    assert lead_in(inline) == "):"  # why the key exists: the text before {behaviour} is no prompt here
    for cfg, want in ((ProfileConfig(template=template), "The user watched:"),
                      (ProfileConfig(template=inline, ceiling_lead_in="The user watched these movies:"),
                       "The user watched these movies:")):
        corpus = build_corpus(prepared, tok, cfg)
        assert corpus.context
        head = tok(want, add_special_tokens=False)["input_ids"]
        assert all(ids[: len(head)] == head for ids in corpus.context.values())
