"""`--name` for a prepared dataset, and stats that say whether text was loaded (issue 13)."""

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import CsvDataset
from userip.cli import app
from userip.data import format_stats, load_stats, prepare
from userip.errors import UseripError


def _args(ds: CsvDataset) -> dict:
    return dict(interactions=ds.interactions, items=ds.items, users=ds.users, config=ds.config)


def test_name_is_recorded_and_printed(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "d"
    res = runner.invoke(app, ["data", "prepare", "--out", str(out), "--interactions", str(csv_dataset.interactions),
                              "--items", str(csv_dataset.items), "--users", str(csv_dataset.users),
                              "--config", str(csv_dataset.config), "--name", "shop-clicks"])
    assert res.exit_code == 0, res.output
    assert load_stats(out)["dataset"] == "shop-clicks"
    assert "dataset shop-clicks" in res.output
    # without --name: the interactions file's stem, as before
    assert prepare(tmp_path / "d2", **_args(csv_dataset)).stats["dataset"] == "interactions"


def test_name_kept_for_a_subset_and_bad_name(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path) -> None:
    d = prepare(tmp_path / "d", name="mine", max_users=5, seed=1, **_args(csv_dataset))
    assert d.stats["dataset"] == "mine" and d.stats["subset"] == {"max_users": 5, "seed": 1}
    with pytest.raises(UseripError, match="--name"):
        prepare(tmp_path / "d3", name="  ", **_args(csv_dataset))


def test_stats_say_whether_text_was_loaded(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path) -> None:
    plain = prepare(tmp_path / "plain", **_args(csv_dataset))
    assert plain.stats["text_columns"] == []
    assert "text    none loaded" in format_stats(plain.stats)
    inter = pd.read_csv(csv_dataset.interactions)
    inter["review"] = "a fine film"
    inter.to_csv(csv_dataset.interactions, index=False)
    cfg = csv_dataset.config.read_text().replace("timestamp: ts}", "timestamp: ts, text: review}")
    assert cfg != csv_dataset.config.read_text()
    csv_dataset.config.write_text(cfg)
    rev = prepare(tmp_path / "rev", **_args(csv_dataset))
    assert rev.stats["text_columns"] == ["interactions.text"]
    assert "text    loaded: interactions.text" in format_stats(rev.stats)
