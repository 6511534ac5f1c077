"""Shared fixtures. The data fixtures write tiny synthetic datasets (never real MovieLens) to tmp_path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# Interactions per user: covers 1 and 2 (no val), 3 (first with val) and longer histories.
TINY_COUNTS = [1, 2, 3, 5, 8, 10, 12, 15, 20, 25]
TINY_N_ITEMS = 30
TINY_GENRES = ["Action", "Comedy", "Drama", "Sci-Fi", "Children's"]
TINY_OCCUPATIONS = ["student", "engineer", "artist", "other"]


@dataclass
class TinyData:
    """The synthetic dataset as DataFrames (canonical names), before any file format is applied."""

    interactions: pd.DataFrame  # user_id, item_id, rating, timestamp (file order)
    items: pd.DataFrame  # item_id, title, year (0 = unknown), genres (list)
    users: pd.DataFrame  # user_id, age, gender, occupation, zip_code


def make_tiny(seed: int = 0) -> TinyData:
    """10 users, 30 items, 5 genres; timestamps with some ties; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    rows = []
    for u, n in enumerate(TINY_COUNTS, start=1):
        t = 880_000_000 + u * 1000
        for _ in range(n):
            t += int(rng.choice([0, 0, 60, 3600, 86400]))  # zero steps create timestamp ties
            rows.append((str(u), str(int(rng.integers(1, TINY_N_ITEMS + 1))), float(rng.integers(1, 6)), t))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    inter = inter.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # file order != time order
    items = pd.DataFrame(
        {
            "item_id": [str(i) for i in range(1, TINY_N_ITEMS + 1)],
            "title": [f"Movie {i}" for i in range(1, TINY_N_ITEMS + 1)],
            "year": [0 if i == 7 else 1980 + i for i in range(1, TINY_N_ITEMS + 1)],  # item 7: unknown year
            "genres": [
                [TINY_GENRES[j] for j in sorted(rng.choice(5, size=1 + i % 3, replace=False))]
                for i in range(TINY_N_ITEMS)
            ],
        }
    )
    users = pd.DataFrame(
        {
            "user_id": [str(u) for u in range(1, len(TINY_COUNTS) + 1)],
            "age": [15, 22, 30, 40, 47, 52, 60, 33, 28, 19],
            "gender": ["M", "F"] * 5,
            "occupation": [TINY_OCCUPATIONS[u % 4] for u in range(len(TINY_COUNTS))],
            "zip_code": [f"{10000 + u}" for u in range(len(TINY_COUNTS))],
        }
    )
    return TinyData(inter, items, users)


def write_recbole(tiny: TinyData, d: Path) -> Path:
    """Write ``tiny`` as RecBole atomic files (the ML-100K schema inside the recbole wheel)."""
    d.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [
        f"{r.user_id}\t{r.item_id}\t{int(r.rating)}\t{r.timestamp}" for r in tiny.interactions.itertuples()
    ]
    (d / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for r in tiny.items.itertuples():
        year = "unkonwn" if r.year == 0 else str(r.year)  # mimic ML-100K item 267
        lines.append(f"{r.item_id}\t{r.title}\t{year}\t{' '.join(r.genres)}")
    (d / "ml-100k.item").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    lines += [
        f"{r.user_id}\t{r.age}\t{r.gender}\t{r.occupation}\t{r.zip_code}" for r in tiny.users.itertuples()
    ]
    (d / "ml-100k.user").write_text("\n".join(lines) + "\n")
    return d


@dataclass
class CsvDataset:
    interactions: Path
    items: Path
    users: Path
    config: Path
    tiny: TinyData


# Column names deliberately differ from the canonical ones: the config mapping has to do the work.
CSV_CONFIG = """\
data:
  columns:
    interactions: {user_id: uid, item_id: iid, rating: stars, timestamp: ts}
    items: {item_id: movie_id, title: name, genres: cats, year: released}
    users: {user_id: uid, features: [age, sex, job]}
  genre_sep: "|"
  side_features: [age, sex, job]
  bins: {age: [18, 25, 35, 45, 50, 56]}
"""


def write_csv(tiny: TinyData, d: Path) -> CsvDataset:
    """Write ``tiny`` as generic CSVs with custom column names, plus the YAML mapping them."""
    d.mkdir(parents=True, exist_ok=True)
    inter = tiny.interactions.rename(
        columns={"user_id": "uid", "item_id": "iid", "rating": "stars", "timestamp": "ts"}
    )
    inter.to_csv(d / "interactions.csv", index=False)
    items = pd.DataFrame(
        {
            "movie_id": tiny.items["item_id"],
            "name": tiny.items["title"],
            "released": [("" if y == 0 else str(y)) for y in tiny.items["year"]],
            "cats": ["|".join(g) for g in tiny.items["genres"]],
        }
    )
    items.to_csv(d / "items.csv", index=False)
    users = tiny.users.rename(columns={"user_id": "uid", "gender": "sex", "occupation": "job"})
    users.to_csv(d / "users.csv", index=False)
    (d / "config.yaml").write_text(CSV_CONFIG)
    return CsvDataset(d / "interactions.csv", d / "items.csv", d / "users.csv", d / "config.yaml", tiny)


@pytest.fixture
def tiny_data() -> TinyData:
    return make_tiny()


@pytest.fixture
def recbole_dir(tmp_path: Path, tiny_data: TinyData) -> Path:
    """A tiny dataset in the ML-100K RecBole schema (ml-100k.inter/.item/.user) under tmp_path."""
    return write_recbole(tiny_data, tmp_path / "recbole")


@pytest.fixture
def csv_dataset(tmp_path: Path, tiny_data: TinyData) -> CsvDataset:
    """The same tiny dataset as generic CSVs with a column-mapping config."""
    return write_csv(tiny_data, tmp_path / "csv")


@pytest.fixture
def data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point userip's cache at tmp_path so a test never reads or writes the user's real cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("USERIP_CACHE_DIR", str(d))
    return d


@pytest.fixture
def prepared(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path):
    """The CSV dataset prepared into tmp_path/data (a PreparedData)."""
    from userip.data import prepare

    return prepare(
        tmp_path / "data",
        interactions=csv_dataset.interactions,
        items=csv_dataset.items,
        users=csv_dataset.users,
        config=csv_dataset.config,
    )


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """The tiny random test LLM saved as a local Hugging Face model directory (what --model accepts)."""
    from userip.llm import tiny_llm

    llm = tiny_llm(seed=0)
    d = tmp_path / "tiny-model"
    llm.model.save_pretrained(d)
    llm.tokenizer.save_pretrained(d)
    return d
