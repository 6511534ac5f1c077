"""The data fingerprint covers the split and labels, not only the id sets (issue 13)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import CsvDataset
from userip.bank import check_compatible
from userip.data import load_prepared, prepare
from userip.data.fingerprint import fingerprint_ids, fingerprint_mismatch
from userip.errors import InputError, UseripError


def _prep(ds: CsvDataset, out: Path, **config) -> object:
    cfg = ds.config
    if config:
        extra = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in config.items())
        cfg = ds.config.with_name("alt.yaml")
        cfg.write_text(ds.config.read_text() + extra + "\n")
    return prepare(out, interactions=ds.interactions, items=ds.items, users=ds.users, config=cfg)


def test_resplit_or_relabelled_data_gets_another_fingerprint(tmp_path: Path, csv_dataset: CsvDataset,
                                                            data_cache: Path) -> None:
    base = _prep(csv_dataset, tmp_path / "a")
    resplit = _prep(csv_dataset, tmp_path / "b", split={"mode": "per_user", "val_frac": 0.2, "test_frac": 0.2})
    relabel = _prep(csv_dataset, tmp_path / "c", label_threshold=3.0)
    assert base.id_maps == resplit.id_maps == relabel.id_maps  # same ids: version 1 could not tell them apart
    assert len({base.fingerprint, resplit.fingerprint, relabel.fingerprint}) == 3
    # a bank built on the base data is refused on the re-split one
    with pytest.raises(UseripError, match="other data.*split or labels"):
        check_compatible({"data_fingerprint": base.fingerprint}, resplit.fingerprint)
    # row order of the input still does not matter, as long as it gives the same split: users' rows in another
    # order, each user's own rows in theirs (file order breaks timestamp ties in the split)
    df = pd.read_csv(csv_dataset.interactions)
    rank = {u: r for r, u in enumerate(df["uid"].drop_duplicates().sample(frac=1.0, random_state=3))}
    df = df.assign(_r=df["uid"].map(rank)).sort_values("_r", kind="stable").drop(columns="_r")
    assert df.index.tolist() != sorted(df.index)
    df.to_csv(csv_dataset.interactions, index=False)
    assert _prep(csv_dataset, tmp_path / "d").fingerprint == base.fingerprint


def test_edited_split_in_a_data_dir_is_caught(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path) -> None:
    d = _prep(csv_dataset, tmp_path / "a")
    inter = pd.read_parquet(d.path / "interactions.parquet")
    inter.loc[inter.index[0], "split"] = "test" if inter.loc[inter.index[0], "split"] != "test" else "train"
    inter.to_parquet(d.path / "interactions.parquet", index=False)
    with pytest.raises(InputError, match="fingerprint does not match"):
        load_prepared(d.path)


def test_a_data_dir_from_before_version_2_still_loads(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    d = _prep(csv_dataset, tmp_path / "a")
    stats = json.loads((d.path / "stats.json").read_text())
    stats.pop("fingerprint_version")
    stats["fingerprint"] = fingerprint_ids(d.id_maps["user"], d.id_maps["item"])  # what userip < v2 wrote
    (d.path / "stats.json").write_text(json.dumps(stats))
    old = load_prepared(d.path)
    assert old.fingerprint == stats["fingerprint"]  # profiles and banks built on it still match
    assert "older userip" in caplog.text
    # a bank from before v2 on re-prepared data: the message says the definition changed, not "other data"
    msg = fingerprint_mismatch("the bank", old.fingerprint, d.fingerprint)
    assert "older userip" in msg and "cannot tell" in msg
    stats["fingerprint_version"] = 99
    (d.path / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(InputError, match="fingerprint_version 99 is newer"):
        load_prepared(d.path)
