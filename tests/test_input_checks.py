"""Inputs that used to load silently wrong, or fail with an unclear message (issue 13)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import yaml

from userip.data import prepare
from userip.errors import InputError, UseripError


def _prepare(ds, out: Path, **kw):
    args = dict(interactions=ds.interactions, items=ds.items, users=ds.users, config=ds.config)
    return prepare(out, **{**args, **kw})


def test_duplicated_header_column_is_named(tmp_path: Path, csv_dataset, data_cache) -> None:
    lines = csv_dataset.interactions.read_text().splitlines()
    lines = [lines[0] + ",stars"] + [line + ",1" for line in lines[1:]]
    csv_dataset.interactions.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="duplicate column name 'stars'"):
        _prepare(csv_dataset, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_semicolon_file_names_the_separator_key(tmp_path: Path, csv_dataset, data_cache) -> None:
    df = pd.read_csv(csv_dataset.interactions, dtype=str)
    df.to_csv(csv_dataset.interactions, sep=";", index=False)
    with pytest.raises(InputError, match=r"semicolon-separated.*csv_sep: ';'"):
        _prepare(csv_dataset, tmp_path / "out")


def test_binary_label_log_without_rating_names_the_label_key(tmp_path: Path, csv_dataset, data_cache) -> None:
    df = pd.read_csv(csv_dataset.interactions, dtype=str).drop(columns=["stars"])
    df["clicked"] = "1"
    df.to_csv(csv_dataset.interactions, index=False)
    with pytest.raises(InputError, match=r"columns\.interactions\.rating.*columns\.interactions\.label"):
        _prepare(csv_dataset, tmp_path / "out")


def test_space_separated_genres_warn_naming_genre_sep(tmp_path: Path, csv_dataset, data_cache, caplog) -> None:
    items = pd.read_csv(csv_dataset.items, dtype=str, keep_default_na=False)
    assert items["cats"].str.contains("|", regex=False).sum() >= 2
    items["cats"] = items["cats"].str.replace("|", " ", regex=False)
    items.to_csv(csv_dataset.items, index=False)
    with caplog.at_level(logging.WARNING, logger="userip"):
        _prepare(csv_dataset, tmp_path / "out")
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "genre_sep" in msg and "implausible" in msg and "space-separated" in msg


def test_good_genres_do_not_warn(tmp_path: Path, csv_dataset, data_cache, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="userip"):
        _prepare(csv_dataset, tmp_path / "out")
    assert "genre_sep" not in " ".join(r.getMessage() for r in caplog.records)


def test_single_interaction_users_are_counted_and_warned(tmp_path: Path, csv_dataset, data_cache, caplog) -> None:
    before = _prepare(csv_dataset, tmp_path / "before").stats["n_users_single_interaction"]
    inter = pd.read_csv(csv_dataset.interactions, dtype=str)
    users = pd.read_csv(csv_dataset.users, dtype=str)
    new = users.iloc[[0]].copy()
    new["uid"] = "lonely"
    users = pd.concat([users, new], ignore_index=True)
    users.to_csv(csv_dataset.users, index=False)
    row = inter.iloc[[0]].copy()
    row["uid"] = "lonely"
    pd.concat([inter, row], ignore_index=True).to_csv(csv_dataset.interactions, index=False)
    with caplog.at_level(logging.WARNING, logger="userip"):
        d = _prepare(csv_dataset, tmp_path / "out")
    n = before + 1  # the tiny data already holds one such user
    assert d.stats["n_users_single_interaction"] == n and d.stats["n_users_without_train"] == n
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"{n} of 11 users have no train interactions ({n} with a single interaction)" in msg
    from userip.data import format_stats

    assert f"without train {n} ({n} with a single interaction)" in format_stats(d.stats)


@pytest.mark.parametrize(
    "section, bad", [("ctr", {"backbone": ["dcn"]}), ("explain", {"topk": 3}), ("baselines", {"max_item": 5})]
)
def test_unknown_keys_in_run_sections_are_a_clear_error(tmp_path: Path, section: str, bad: dict) -> None:
    from userip.run import run

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({section: bad}))
    with pytest.raises(UseripError, match=rf"unknown keys \['{next(iter(bad))}'\] in the '{section}:' section"):
        run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything ran
