"""The real MovieLens-100K via the PyPI fallback (recbole==1.2.1 wheel). Needs PyPI; the data is cached in a
temp dir, never in the repository (the licence forbids redistribution)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from userip.data import ctr_examples, format_stats, load_prepared, prepare
from userip.data.ml100k import RECBOLE_SHA256
from userip.io import sha256_file

pytestmark = pytest.mark.integration


def test_ml100k_prepare_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import userip.data.ml100k as ml

    cache = tmp_path / "cache"
    monkeypatch.setenv("USERIP_CACHE_DIR", str(cache))
    data = prepare(tmp_path / "d1", dataset="ml-100k")
    s = data.stats
    assert (s["n_interactions"], s["n_users"], s["n_items"], s["n_genres"]) == (100000, 943, 1682, 19)
    assert "recbole==1.2.1" in s["source"] or "GroupLens" in s["source"]
    text = format_stats(s)
    for n in ("100000", "943", "1682"):
        assert n in text
    assert data.items.title[data.items.item_id == "1"].item() == "Toy Story (1995)"
    assert set(data.users.columns) >= {"age", "gender", "occupation"}
    assert sum(v["interactions"] for v in s["splits"].values()) == 100000
    cached = cache / "datasets" / "ml-100k" / "recbole"
    if cached.is_dir():  # the PyPI path was taken (no network to GroupLens): verify the cached files
        for name, digest in RECBOLE_SHA256.items():
            assert sha256_file(cached / name) == digest

    # second call: from the cache, no network, no pip
    def forbidden(*a, **k):
        raise AssertionError("the second prepare must not touch the network or pip")

    monkeypatch.setattr(ml.subprocess, "run", forbidden)
    monkeypatch.setattr(ml.urllib.request, "urlopen", forbidden)
    t0 = time.perf_counter()
    again = prepare(tmp_path / "d2", dataset="ml-100k")
    assert time.perf_counter() - t0 < 20
    assert again.stats["source"].startswith("cache ")
    assert again.fingerprint == data.fingerprint
    back = load_prepared(tmp_path / "d2")
    assert len(ctr_examples(back, "test")) == s["splits"]["test"]["interactions"]
    repo = Path(__file__).resolve().parents[1]
    for top in repo.iterdir():  # nothing of the dataset landed in the repository (skip the big venv)
        if top.name not in (".venv", ".git") and top.is_dir():
            assert not list(top.rglob("ml-100k.inter")) and not list(top.rglob("u.data"))
