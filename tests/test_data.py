"""Data stage: loaders, split, CTR examples, behaviour text, atomic output, CLI (tiny synthetic data)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_COUNTS, CsvDataset, TinyData
from userip.data import (
    CTRExamples,
    DataConfig,
    behaviour_windows,
    ctr_examples,
    format_stats,
    load_prepared,
    load_stats,
    prepare,
    user_histories,
)
from userip.data.fingerprint import fingerprint_ids
from userip.data.ml100k import read_ml100k_dir, read_official, read_recbole
from userip.data.split import per_user_counts
from userip.errors import InputError, UseripError


def _prep(ds: CsvDataset, out: Path, **kw):
    args = dict(interactions=ds.interactions, items=ds.items, users=ds.users, config=ds.config)
    return prepare(out, **{**args, **kw})


def _by_user(data) -> dict[str, pd.DataFrame]:
    inter = data.interactions
    return {uid: inter[inter.user_idx == idx] for uid, idx in data.id_maps["user"].items()}


# ---------------------------------------------------------------------------------------------- loaders
def test_recbole_reader(recbole_dir: Path, tiny_data: TinyData) -> None:
    raw = read_recbole(recbole_dir)
    assert len(raw.interactions) == sum(TINY_COUNTS)
    assert len(raw.items) == 30 and len(raw.users) == 10
    titles = dict(zip(raw.items.item_id, raw.items.title, strict=True))
    assert titles["1"] == "Movie 1 (1981)"
    assert titles["7"] == "Movie 7"  # unknown year ("unkonwn") -> bare title
    genres = dict(zip(raw.items.item_id, raw.items.genres, strict=True))
    assert genres["1"] == tiny_data.items.genres[0]
    assert list(raw.users.columns[:4]) == ["user_id", "age", "gender", "occupation"]


def test_ml100k_local_source_is_verified(recbole_dir: Path, tmp_path: Path, data_cache: Path) -> None:
    with pytest.raises(InputError, match=r"ml-100k\.inter.*sha256 mismatch"):
        prepare(tmp_path / "out", dataset="ml-100k", source=recbole_dir)
    assert not (tmp_path / "out").exists()


def test_ml100k_local_source_unverified_uses_preset(
    recbole_dir: Path, tmp_path: Path, data_cache: Path
) -> None:
    data = prepare(
        tmp_path / "out", dataset="ml-100k", source=recbole_dir, config={"verify_checksums": False}
    )
    assert data.stats["n_interactions"] == sum(TINY_COUNTS)
    assert data.stats["dataset"] == "ml-100k" and "local directory" in data.stats["source"]
    assert data.config.side_features == ["age", "gender", "occupation"]  # ML-100K preset: zip dropped
    ex = ctr_examples(data, "train")
    assert set(ex.side) == {"age", "gender", "occupation"}
    assert ex.vocab["age"] == 8  # 7 age bins + unknown
    assert not any(data_cache.rglob("ml-100k.*")), "a local source must not be copied into the cache"


def test_official_layout(tmp_path: Path, tiny_data: TinyData, data_cache: Path) -> None:
    d = tmp_path / "official"
    d.mkdir()
    t = tiny_data
    (d / "u.data").write_text(
        "".join(
            f"{r.user_id}\t{r.item_id}\t{int(r.rating)}\t{r.timestamp}\n" for r in t.interactions.itertuples()
        )
    )
    from userip.data.ml100k import OFFICIAL_GENRES as genres

    lines = []
    for r in t.items.itertuples():
        flags = "|".join("1" if g in r.genres else "0" for g in genres)
        date = "" if r.year == 0 else f"01-Jan-{r.year}"
        title = r.title if r.year == 0 else f"{r.title} ({r.year})"
        lines.append(f"{r.item_id}|{title}|{date}||http://x|{flags}")
    (d / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (d / "u.user").write_text(
        "".join(f"{r.user_id}|{r.age}|{r.gender}|{r.occupation}|{r.zip_code}\n" for r in t.users.itertuples())
    )
    raw = read_official(d)
    assert raw.items.title[0] == "Movie 1 (1981)" and raw.items.year[0] == 1981
    assert raw.items.genres[0] == [g for g in genres if g in t.items.genres[0]]
    with pytest.raises(InputError, match="not the MovieLens-100K release"):
        read_ml100k_dir(d)  # counts checked for the official layout
    data = prepare(tmp_path / "out", dataset="ml-100k", source=d, config={"verify_checksums": False})
    assert data.stats["n_users"] == 10


def test_generic_csv_with_column_mapping(prepared, csv_dataset: CsvDataset) -> None:
    d = prepared
    t = csv_dataset.tiny
    assert (d.stats["n_interactions"], d.stats["n_users"], d.stats["n_items"]) == (sum(TINY_COUNTS), 10, 30)
    assert d.stats["n_genres"] == 5 and sorted(d.genre_vocab) == d.genre_vocab
    row = d.items[d.items.item_id == "3"].iloc[0]
    assert row.title == "Movie 3 (1983)" and list(row.genres) == t.items.genres[2]
    assert d.items[d.items.item_id == "7"].iloc[0].title == "Movie 7"
    assert list(d.users.columns) == ["user_idx", "user_id", "age", "sex", "job"]
    # ids are dense from 1, ordered numerically, original ids kept as strings
    assert d.user_index(["1", "10", "nope"]).tolist() == [1, 10, 0]
    assert d.user_ids([1, 10]) == ["1", "10"]
    with pytest.raises(UseripError):
        d.user_ids([0])
    assert (d.n_users, d.n_items) == (10, 30)
    inter = d.interactions
    assert list(inter.columns) == ["user_idx", "item_idx", "rating", "label", "timestamp", "split"]
    assert (
        inter.rating.dtype == np.float32
        and inter.label.dtype == np.int8
        and inter.timestamp.dtype == np.int64
    )
    keys = list(zip(inter.user_idx, inter.timestamp, strict=True))
    assert keys == sorted(keys)
    assert (inter.label == (inter.rating >= 4)).all()


def test_parquet_with_list_genres_label_and_text(
    tmp_path: Path, tiny_data: TinyData, data_cache: Path
) -> None:
    t = tiny_data
    inter = t.interactions.drop(columns="rating").assign(
        clicked=(np.arange(len(t.interactions)) % 3 == 0).astype(int),
        review=[f"review {i} words here" for i in range(len(t.interactions))],
    )
    inter.to_parquet(tmp_path / "inter.parquet")
    items = t.items.assign(categories=t.items.genres, description="an item").drop(columns=["genres", "year"])
    items.to_parquet(tmp_path / "items.parquet")
    cfg = {
        "columns": {
            "interactions": {"label": "clicked", "text": "review"},
            "items": {"genres": "categories", "text": "description"},
        }
    }
    d = prepare(
        tmp_path / "out",
        interactions=tmp_path / "inter.parquet",
        items=tmp_path / "items.parquet",
        config=cfg,
    )
    assert d.interactions.label.sum() == inter.clicked.sum()
    assert d.interactions.rating.isna().all()
    assert "text" in d.interactions.columns and "text" in d.items.columns
    assert d.items.genres[0] == t.items.genres[0]
    assert list(d.users.columns) == ["user_idx", "user_id"]  # no users file: ids from the interactions
    assert "clicked" in format_stats(d.stats)
    back = load_prepared(tmp_path / "out")
    assert back.interactions.text.tolist() == d.interactions.text.tolist()


def test_delimited_genres_and_datetime_timestamps(tmp_path: Path, data_cache: Path) -> None:
    (tmp_path / "i.csv").write_text(
        "user_id;item_id;rating;timestamp\nu1;a;5;2020-01-01T00:00:00\nu1;b;3;2020-01-02T00:00:00\n"
    )
    (tmp_path / "it.csv").write_text("item_id;title;genres\na;Alpha;x, y\nb;Beta;\n")
    cfg = {"csv_sep": ";", "genre_sep": ",", "timestamp_format": "datetime"}
    d = prepare(tmp_path / "o", interactions=tmp_path / "i.csv", items=tmp_path / "it.csv", config=cfg)
    assert d.items.genres.tolist() == [["x", "y"], []]
    assert d.interactions.timestamp.tolist() == [1577836800, 1577923200]


# ---------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, (0, 0, 1)), (2, (1, 0, 1)), (3, (1, 1, 1)), (10, (8, 1, 1)), (15, (13, 1, 1)), (20, (16, 2, 2)),
     (25, (21, 2, 2)), (30, (24, 3, 3))],
)  # fmt: skip
def test_per_user_counts(n: int, expected: tuple[int, int, int]) -> None:
    n_val, n_test = per_user_counts(np.array([n]), 0.1, 0.1)
    assert (n - n_val[0] - n_test[0], n_val[0], n_test[0]) == expected


def test_split_has_no_leakage_and_counts(prepared) -> None:
    for _, g in _by_user(prepared).items():
        n = len(g)
        n_val, n_test = per_user_counts(np.array([n]), 0.1, 0.1)
        counts = g.split.value_counts()
        assert counts.get("test", 0) == n_test[0] and counts.get("val", 0) == n_val[0]
        train_ts = g[g.split == "train"].timestamp
        held = g[g.split != "train"].timestamp
        if len(train_ts):
            assert (held >= train_ts.max()).all()
        if (g.split == "val").any():
            assert g[g.split == "test"].timestamp.min() >= g[g.split == "val"].timestamp.max()
    s = prepared.stats["splits"]
    assert s["train"]["interactions"] + s["val"]["interactions"] + s["test"]["interactions"] == sum(
        TINY_COUNTS
    )


def test_split_ties_broken_by_file_order(tmp_path: Path, data_cache: Path) -> None:
    rows = "".join(f"u,i{k},4,100\n" for k in range(1, 11))  # 10 interactions, same timestamp
    (tmp_path / "i.csv").write_text("user_id,item_id,rating,timestamp\n" + rows)
    (tmp_path / "it.csv").write_text("item_id,title\n" + "".join(f"i{k},T{k}\n" for k in range(1, 11)))
    d = prepare(tmp_path / "o", interactions=tmp_path / "i.csv", items=tmp_path / "it.csv")
    ids = d.item_ids(d.interactions.item_idx)
    assert ids == [f"i{k}" for k in range(1, 11)]  # file order kept within the tie
    assert d.interactions.split.tolist() == ["train"] * 8 + ["val", "test"]


@pytest.mark.parametrize(("val_cut", "test_cut"), [(0.6, 0.8), ("abs", "abs")])
def test_time_cut_split(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path, val_cut, test_cut) -> None:
    ts = np.sort(csv_dataset.tiny.interactions.timestamp.to_numpy())
    if val_cut == "abs":
        val_cut, test_cut = int(ts[50]), int(ts[80])
    cfg = DataConfig.from_yaml(csv_dataset.config)
    cfg.split.mode, cfg.split.val_cut, cfg.split.test_cut = "time", val_cut, test_cut
    cfg.validate()
    d = _prep(csv_dataset, tmp_path / "o", config=cfg)
    inter = d.interactions
    tr, va, te = (inter[inter.split == s].timestamp for s in ("train", "val", "test"))
    assert len(tr) and len(va) and len(te)
    assert tr.max() < va.min() and va.max() < te.min()
    if isinstance(test_cut, int):
        assert te.min() >= test_cut and tr.max() < val_cut
    cuts = __import__("json").loads((tmp_path / "o" / "split.json").read_text())["resolved_cuts"]
    assert te.min() >= cuts["test_cut"] > va.max()


# ---------------------------------------------------------------------------------------------- CTR
def test_ctr_examples(prepared) -> None:
    d = prepared
    ex = ctr_examples(d, "train", history_len=4)
    assert isinstance(ex, CTRExamples)
    inter = d.interactions
    tr = inter[inter.split == "train"]
    assert len(ex) == len(tr)
    assert ex.label.dtype == np.float32 and ex.user.dtype == np.int64 and ex.history.shape == (len(tr), 4)
    np.testing.assert_array_equal(ex.label, (tr.rating >= 4).to_numpy().astype(np.float32))
    assert ex.vocab["user"] == 11 and ex.vocab["item"] == 31 and ex.vocab["genre"] == 6
    # history: the user's last 4 items strictly earlier in time (any split), most recent last, left-padded
    for k in range(len(ex)):
        u, ts = ex.user[k], ex.timestamp[k]
        past = inter[(inter.user_idx == u) & (inter.timestamp < ts)].item_idx.to_numpy()[-4:]
        expected = np.r_[np.zeros(4 - len(past), dtype=np.int64), past]
        np.testing.assert_array_equal(ex.history[k], expected)
    # genres: codes 1..n_genres in item order, right-padded with 0 to the max genre count (3)
    assert ex.genres.shape[1] == 3
    for k in range(len(ex)):
        names = d.items.set_index("item_idx").genres[ex.item[k]]
        codes = [d.genre_vocab.index(g) + 1 for g in names]
        assert ex.genres[k].tolist() == codes + [0] * (3 - len(codes))
    # side features: vocab from the users table, ages bucketed, codes 1..V
    assert set(ex.side) == {"age", "sex", "job"}
    assert ex.vocab["age"] == 8 and ex.vocab["sex"] == 3 and ex.vocab["job"] == 5
    age_of = dict(zip(d.users.user_idx, d.users.age, strict=True))
    bins = [18, 25, 35, 45, 50, 56]
    for u, code in zip(ex.user, ex.side["age"], strict=True):
        assert code == np.searchsorted(bins, age_of[u], side="right") + 1
    # test examples see train+val history, and vocabularies do not depend on the split
    te = ctr_examples(d, "test", history_len=4)
    assert te.vocab == ex.vocab and (te.history[:, -1] > 0).sum() > 0
    sub = ex.subset(ex.label == 1)
    assert len(sub) == int(ex.label.sum()) and (sub.label == 1).all() and sub.side["age"].shape == (len(sub),)
    assert len(ctr_examples(d, "all")) == sum(TINY_COUNTS)


def test_ctr_unknown_side_value_is_zero(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path) -> None:
    users = pd.read_csv(csv_dataset.users, dtype=str)
    users.loc[0, "age"] = ""
    users.loc[1, "job"] = ""
    users.to_csv(csv_dataset.users, index=False)
    d = _prep(csv_dataset, tmp_path / "o", config=csv_dataset.config)
    ex = ctr_examples(d, "all")
    assert (ex.side["age"][ex.user == 1] == 0).all() and (ex.side["job"][ex.user == 2] == 0).all()
    assert (ex.side["age"][ex.user != 1] > 0).all()


# ---------------------------------------------------------------------------------------------- text
class WhitespaceTokenizer:
    """Stub tokenizer: one token per whitespace-separated word."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.encode(text)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(w) for w in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join("w" * i for i in ids)


def test_behaviour_windows_order_and_max_items(prepared) -> None:
    d = prepared
    wins = behaviour_windows(d, "train", max_items=4)
    hist = user_histories(d, "train")
    assert set(wins) == set(hist)
    title = dict(zip(d.items.item_idx, d.items.title, strict=True))
    for u, w in wins.items():
        parts = [p.split("; ") for p in w]
        assert all(1 <= len(p) <= 4 for p in parts)
        assert [t for p in parts for t in p] == [title[i] for i in hist[u]]  # all items, time order
        assert len(w) == -(-len(hist[u]) // 4)
    g = d.interactions[(d.interactions.split == "train")]
    u = g.user_idx.value_counts().idxmax()
    assert hist[u].tolist() == g[g.user_idx == u].item_idx.tolist()


def test_behaviour_windows_token_limit(prepared) -> None:
    tok = WhitespaceTokenizer()
    wins = behaviour_windows(prepared, "train", max_items=16, tokenizer=tok, max_tokens=7)
    hist = user_histories(prepared, "train")
    title = dict(zip(prepared.items.item_idx, prepared.items.title, strict=True))
    for u, w in wins.items():
        assert all(len(tok.encode(x)) <= 7 for x in w)
        assert [t for x in w for t in x.split("; ")] == [title[i] for i in hist[u]]  # no title cut
    # greedy: a window is closed only when the next title would not fit
    for w in wins.values():
        for a, b in zip(w[:-1], w[1:], strict=True):
            assert len(tok.encode(a + "; " + b.split("; ")[0])) > 7
    # a title longer than the budget is kept whole, alone
    w = behaviour_windows(prepared, "train", tokenizer=tok, max_tokens=2)
    assert all(len(x.split("; ")) == 1 for ws in w.values() for x in ws)


def test_behaviour_windows_review_mode(
    tmp_path: Path, tiny_data: TinyData, data_cache: Path, prepared
) -> None:
    with pytest.raises(UseripError, match="no text column"):
        behaviour_windows(prepared, mode="review")
    inter = tiny_data.interactions.assign(review=[f"great film number {i} indeed" for i in range(101)])
    inter.to_csv(tmp_path / "i.csv", index=False)
    tiny_data.items.drop(columns="genres").to_csv(tmp_path / "it.csv", index=False)
    cfg = {"columns": {"interactions": {"text": "review"}, "items": {"genres": None, "year": "year"}}}
    d = prepare(tmp_path / "o", interactions=tmp_path / "i.csv", items=tmp_path / "it.csv", config=cfg)
    wins = behaviour_windows(d, "train", mode="review", tokenizer=WhitespaceTokenizer(), max_tokens=3)
    n_train = (d.interactions.split == "train").sum()
    assert sum(len(w) for w in wins.values()) == n_train
    assert all(len(x.split()) == 3 for w in wins.values() for x in w)
    plain = behaviour_windows(d, "train", mode="review", max_tokens=2)  # whitespace words without tokenizer
    assert all(x.startswith("great film") and len(x.split()) == 2 for w in plain.values() for x in w)


# ---------------------------------------------------------------------------------------------- output
def test_load_prepared_round_trip(prepared, tmp_path: Path) -> None:
    back = load_prepared(tmp_path / "data")
    pd.testing.assert_frame_equal(back.interactions, prepared.interactions, check_dtype=False)
    assert back.items.genres.tolist() == prepared.items.genres.tolist()
    assert back.fingerprint == prepared.fingerprint == back.stats["fingerprint"]
    assert back.config == prepared.config
    assert back.id_maps == prepared.id_maps
    assert load_stats(tmp_path / "data") == prepared.stats
    files = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert files == sorted(
        ["interactions.parquet", "items.parquet", "users.parquet", "id_maps.json", "split.json", "stats.json",
         "config.yaml", ".userip.json"]
    )  # fmt: skip
    # version 1 (ids only) is pinned: DATA dirs written before version 2 keep it (test_data_fingerprint.py)
    expected = hashlib.sha256()
    for name, ids in (("users", back.id_maps["user"]), ("items", back.id_maps["item"])):
        expected.update(f"{name}\n".encode())
        for s in sorted(ids):
            expected.update(s.encode() + b"\n")
    assert fingerprint_ids(back.id_maps["user"], back.id_maps["item"]) == expected.hexdigest()
    assert back.stats["fingerprint_version"] == 2 and back.fingerprint.startswith("v2:")


def test_fingerprint_ignores_row_order(tmp_path: Path, csv_dataset: CsvDataset, prepared, data_cache) -> None:
    """Row order alone does not change the fingerprint; the split it gives (file order breaks timestamp ties)
    does, since version 2 covers the split (test_data_fingerprint.py has a reorder that keeps the split)."""
    df = pd.read_csv(csv_dataset.interactions).sample(frac=1.0, random_state=5)
    df.to_csv(csv_dataset.interactions, index=False)
    again = _prep(csv_dataset, tmp_path / "o2", config=csv_dataset.config)
    assert fingerprint_ids(again.id_maps["user"], again.id_maps["item"]) == fingerprint_ids(
        prepared.id_maps["user"], prepared.id_maps["item"])
    cols = ["user_idx", "item_idx", "timestamp", "rating", "label", "split"]

    def rows(d):
        return sorted(map(tuple, d.interactions[cols].astype(str).to_numpy().tolist()))

    assert (again.fingerprint == prepared.fingerprint) == (rows(again) == rows(prepared))


def test_load_prepared_errors(prepared, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_prepared(tmp_path / "missing")
    (tmp_path / "data" / "split.json").unlink()
    with pytest.raises(InputError, match="missing split.json"):
        load_prepared(tmp_path / "data")
    with pytest.raises(InputError, match="no stats.json"):
        load_stats(tmp_path / "missing")


def test_failed_prepare_leaves_no_output(
    tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import userip.data.datadir as mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "write_yaml", boom)  # fails after the Parquet and JSON files are written
    args = dict(
        interactions=csv_dataset.interactions, items=csv_dataset.items, users=csv_dataset.users,
        config=csv_dataset.config,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left behind
    # an existing good output survives a failed re-run untouched
    monkeypatch.undo()
    monkeypatch.setenv("USERIP_CACHE_DIR", str(data_cache))
    good = prepare(tmp_path / "out", **args)
    monkeypatch.setattr(mod, "write_yaml", boom)
    with pytest.raises(RuntimeError):
        prepare(tmp_path / "out", overwrite=True, **args)
    assert load_prepared(tmp_path / "out").fingerprint == good.fingerprint


def test_format_stats(prepared) -> None:
    text = format_stats(prepared.stats)
    s = prepared.stats["splits"]
    for needle in (
        f"interactions {sum(TINY_COUNTS)} | users 10 | items 30",
        f"train {s['train']['interactions']}",
        f"test {s['test']['interactions']}",
        "label rate (rating >= 4)",
    ):
        assert needle in text


def test_config_yaml(tmp_path: Path) -> None:
    repo_cfg = Path(__file__).resolve().parents[1] / "configs" / "ml-100k.yaml"
    cfg = DataConfig.from_yaml(repo_cfg)
    assert cfg.dataset == "ml-100k" and cfg.label_threshold == 4.0 and cfg.split.test_frac == 0.1
    assert cfg.side_features == ["age", "gender", "occupation"]
    p = tmp_path / "c.yaml"
    p.write_text("split:\n  val_frac: 0.2\n")
    assert DataConfig.from_yaml(p).split.val_frac == 0.2
    assert DataConfig.from_yaml(p).split.test_frac == 0.1


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_prepare_and_stats(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path) -> None:
    from typer.testing import CliRunner

    from userip.cli import app

    runner = CliRunner()
    out = tmp_path / "cli_out"
    ds = csv_dataset
    args = ["data", "prepare", "--out", str(out), "--interactions", str(ds.interactions),
            "--items", str(ds.items), "--users", str(ds.users), "--config", str(ds.config)]  # fmt: skip
    res = runner.invoke(app, args)
    text = " ".join(res.output.split())  # rich may wrap long lines
    assert res.exit_code == 0, res.output
    assert f"interactions {sum(TINY_COUNTS)} | users 10 | items 30" in text
    assert (out / "stats.json").is_file()
    res = runner.invoke(app, ["data", "stats", str(out)])
    assert res.exit_code == 0 and "users 10" in " ".join(res.output.split())
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,iid,stars\n1,2,3\n")
    res = runner.invoke(app, [*args[:5], str(bad), *args[6:], "--overwrite"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2
    assert "missing interactions column 'ts'" in text and "Traceback" not in text


def test_config_alone_describes_a_dataset(csv_dataset: CsvDataset, tmp_path: Path, data_cache: Path) -> None:
    cfg = csv_dataset.config
    paths = "  interactions: interactions.csv\n  items: items.csv\n  users: users.csv\n"
    cfg.write_text(cfg.read_text() + paths)
    d = prepare(tmp_path / "o", config=cfg)  # relative paths resolved against the config's folder
    assert d.stats["n_interactions"] == sum(TINY_COUNTS) and d.stats["dataset"] == "interactions"
