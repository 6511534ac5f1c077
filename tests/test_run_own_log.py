"""The main job on a user's own log: a binary-label CTR log with titles and no users file (no side features).

Issue 13: `userip run` on such a log failed at the probe stage ("users table has no column(s) ['age_bucket',
...]"), so there was no report. The probe must use the features the dataset has and say when there are none.
"""

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from userip.cli import app
from userip.data.synthetic import write_taste_world


def _binary_log(d):
    """The taste world as a CTR log: a 0/1 `click` column instead of ratings, '/'-separated genres, no users."""
    write_taste_world(d, n_users=24, n_items=30)
    inter = pd.read_csv(d / "inter.csv")
    inter["click"] = (inter["rating"] >= 4).astype(int)
    inter.drop(columns=["rating"]).rename(columns={"user_id": "uid", "item_id": "iid", "timestamp": "ts"}).to_csv(
        d / "clicks.csv", index=False)
    items = pd.read_csv(d / "items.csv").rename(columns={"item_id": "iid", "title": "name", "genres": "tags"})
    items["tags"] = items["tags"] + "/Film"
    items.to_csv(d / "items_own.csv", index=False)
    (d / "users.csv").unlink()


@pytest.fixture
def own_log_config(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("USERIP_CACHE_DIR", str(tmp_path / "cache"))
    w = tmp_path / "log"
    _binary_log(w)
    cfg = {
        "seed": 0,
        "model": str(tiny_model_dir),
        "data": {"interactions": str(w / "clicks.csv"), "items": str(w / "items_own.csv"), "genre_sep": "/",
                 "columns": {"interactions": {"user_id": "uid", "item_id": "iid", "timestamp": "ts",
                                              "rating": None, "label": "click"},
                             "items": {"item_id": "iid", "title": "name", "genres": "tags"}}},
        "profile": {"epochs": 1, "batch_users": 8, "max_tokens": 32, "eval_users": 12},
        "ctr": {"backbones": ["dcn"], "seeds": 1, "max_epochs": 3, "batch_size": 64, "bootstrap": 50},
        "baselines": {"text_profile": False, "content_kmeans": False},
        "quick": {"users": 20},
    }
    p = tmp_path / "own.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_run_quick_on_log_without_side_features_reports_nothing_to_probe(own_log_config, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--config", str(own_log_config), "--out", str(out), "--quick"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "probe.json").read_text()) == []
    report = (out / "report.md").read_text()
    assert "## Validity probe" in report and "Nothing to probe" in report
    record = json.loads((out / "run.json").read_text())
    assert all(record["stages"][s]["status"] == "done" for s in record["stages"])
    assert record["stages"]["probe"]["info"]["targets"] == []
    assert json.loads((out / ".userip.json").read_text())["complete"] is True
