"""`userip run --quick` end to end on a fixture dataset with the tiny LLM: every stage, the report, resume."""

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from userip.cli import app
from userip.data.synthetic import write_taste_world


@pytest.fixture
def run_config(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("USERIP_CACHE_DIR", str(tmp_path / "cache"))  # pooled states, ceiling: never the real cache
    write_taste_world(tmp_path / "world")
    w = tmp_path / "world"
    cfg = {
        "seed": 0,
        "model": str(tiny_model_dir),
        "data": {"interactions": str(w / "inter.csv"), "items": str(w / "items.csv"), "users": str(w / "users.csv"),
                 "side_features": ["age", "gender", "occupation"]},
        "profile": {"epochs": 3, "batch_users": 8, "max_tokens": 48, "inner_steps": 4},
        "ctr": {"backbones": ["dcn", "deepfm"], "seeds": 3, "max_epochs": 30, "batch_size": 64, "lr": 0.01},
        "baselines": {"max_new_tokens": 8, "batch_size": 8},
        "quick": {"users": 32, "profile": {"epochs": 2, "inner_steps": 2}, "ctr": {"seeds": 2}},
    }
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_run_quick_end_to_end_and_resume(run_config, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--config", str(run_config), "--out", str(out), "--quick"])
    assert r.exit_code == 0, r.output
    for f in ("data/stats.json", "profiles/profile_ids.parquet", "bank.sqlite", "ctr/results.json",
              "ctr/results.md", "explanations.json", "probe.json", "report.md", "report.html",
              "plots/em_curves.png", "plots/code_usage.png", "plots/ctr_forest.png", "plots/stage_costs.png"):
        assert (out / f).exists(), f
    assert list((out / "ctr" / "models").glob("*.safetensors"))
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["n_users"] == 32  # --quick's seeded user subset reached every stage
    runs = pd.DataFrame(json.loads((out / "ctr" / "results.json").read_text())["runs"])
    # the default table: the headline variants, with the LLM-history competitor and its twin
    assert set(runs["variant"]) == {"base", "+ids", "+ids-permuted", "+activity", "+label-rate", "+ids+label-rate",
                                    "+hist-dense", "+hist-dense-permuted"}
    # only the baseline the default table reads is built (the others cost minutes and are one flag away)
    assert (out / "baselines" / "history" / "profile_ids.parquet").exists()
    for name in ("text-profile", "content-kmeans"):
        assert not (out / "baselines" / name).exists(), name
    assert set(runs["seed"]) == {0, 1}
    report = (out / "report.md").read_text()
    for section in ("## Headline", "## Profiles", "## CTR", "## Validity probe", "## Explanations",
                    "## Cost per stage"):
        assert section in report
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    record = json.loads((out / "run.json").read_text())
    assert all(record["stages"][s]["status"] == "done" for s in record["stages"])

    # a rerun skips every stage; a changed CTR section reruns ctr and report only
    r = CliRunner().invoke(app, ["run", "--config", str(run_config), "--out", str(out), "--quick"])
    assert r.exit_code == 0 and r.output.count("up to date, skipped") == 8, r.output
    cfg = yaml.safe_load(run_config.read_text())
    cfg["quick"]["ctr"]["backbones"] = ["dcn"]
    run_config.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["run", "--config", str(run_config), "--out", str(out), "--quick"])
    assert r.exit_code == 0, r.output
    assert r.output.count("up to date, skipped") == 6, r.output
    runs = pd.DataFrame(json.loads((out / "ctr" / "results.json").read_text())["runs"])
    assert set(runs["backbone"]) == {"dcn"}


def test_baselines_built_are_those_the_ctr_variants_read():
    from userip.run import _baselines_read

    assert _baselines_read({}) == {"history"}
    assert _baselines_read({"variants": "default", "competitor": "+text-ids"}) == {"text-profile"}
    assert _baselines_read({"variants": "all"}) == {"history", "text-profile", "content-kmeans"}
    assert _baselines_read({"variants": "base,+ids,+content-ids,+text-dense-permuted"}) == {"content-kmeans",
                                                                                          "text-profile"}
    assert _baselines_read({"variants": ["base", "+ids", "+ids-permuted"]}) == set()
