"""Reading user-supplied tables (CSV/TSV/Parquet) into one canonical in-memory form, with row-level errors.

Every problem becomes one `InputError` naming the file, the 1-based data row (header not counted) and the
field, plus what was expected: a user who brings their own logs should be able to fix the file from the
message alone, without reading a traceback. Here: files into frames (`read_table`), the config-mapped readers of
your own logs (`read_generic`) and the cross-table checks; one column's values are converted in `columns`.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from userip.data.columns import (
    is_missing,
    parse_year,
    render_title,
    require_columns,
    to_float,
    to_genres,
    to_ids,
    to_label,
    to_text,
    to_timestamp,
    to_titles,
)
from userip.data.config import DataConfig
from userip.errors import InputError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": ",", ".inter": "\t", ".item": "\t", ".user": "\t"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
_RECBOLE_HEADER = re.compile(r"^(?P<name>[^:]+):(token|token_seq|float|float_seq)$")


@dataclass
class RawTables:
    """Canonical tables before re-indexing. Ids are strings; ``_row`` is the 1-based row in the source file.

    interactions: user_id, item_id, rating (float, NaN if absent), label (float 0/1, NaN if not given),
    timestamp (int64), optional text. items: item_id, title (rendered), genres (list[str]), year (float,
    NaN if unknown), optional text. users: user_id + side features (None when there is no users file).
    ``files``/``fields`` remember the source file and original column name of each canonical column so
    the cross-table checks can still point at the user's file and column.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None
    source: str
    files: dict[str, str] = field(default_factory=dict)
    fields: dict[str, dict[str, str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- reading
def read_table(path: str | Path, *, sep: str | None = None) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet file. Text files are read as strings (converted and checked later, per field).

    RecBole "atomic" headers (``user_id:token``) are reduced to the bare name so those files load as-is.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "expected a file, got a directory")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (expected a header row and data rows)")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise InputError(path, f"not a readable Parquet file ({type(e).__name__}: {e})") from None
    elif suffix in TEXT_SUFFIXES:
        df = _read_text(path, sep or TEXT_SUFFIXES[suffix])
    else:
        raise InputError(
            path,
            f"unsupported file type '{suffix}'; expected one of "
            f"{', '.join(sorted(set(TEXT_SUFFIXES) | PARQUET_SUFFIXES))}",
        )
    df.columns = [_strip_type(str(c)) for c in df.columns]
    if suffix in TEXT_SUFFIXES and len(df.columns) == 1:
        _check_single_column(path, str(df.columns[0]), sep or TEXT_SUFFIXES[suffix])
    dup = [c for c in df.columns if list(df.columns).count(c) > 1]
    if dup:
        raise InputError(path, f"duplicate column name '{dup[0]}' in the header", row=None, field=dup[0])
    if len(df) == 0:
        raise InputError(path, f"no data rows (header only: {', '.join(df.columns)})")
    return df.reset_index(drop=True)


def _read_text(path: Path, sep: str) -> pd.DataFrame:
    last: Exception | None = None
    for encoding in ("utf-8", "latin-1"):  # MovieLens' own files are latin-1; most user exports are utf-8
        try:
            with warnings.catch_warnings():
                # A first data row with one field too many would otherwise silently become the index.
                warnings.simplefilter("error", pd.errors.ParserWarning)
                df = pd.read_csv(
                    path, sep=sep, dtype=str, keep_default_na=False, na_values=[], encoding=encoding,
                    quotechar='"', index_col=False,
                )  # fmt: skip
        except UnicodeDecodeError as e:
            last = e
            continue
        except pd.errors.EmptyDataError:
            raise InputError(path, "file is empty (expected a header row and data rows)") from None
        except pd.errors.ParserWarning:
            raise InputError(
                path, f"more {_sep_name(sep)}-separated fields than the header has", row=1
            ) from None
        except pd.errors.ParserError as e:
            m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
            if m:
                raise InputError(
                    path,
                    f"{m.group(3)} {_sep_name(sep)}-separated fields, but the header has {m.group(1)}",
                    row=int(m.group(2)) - 1,
                ) from None
            raise InputError(path, f"cannot parse as {_sep_name(sep)}-separated text: {e}") from None
        # (a row with too few fields reads as empty strings; the per-field checks then name row and field)
        header = _raw_header(path, sep, encoding)
        if header is not None and len(header) == len(df.columns):
            df.columns = header  # pandas renames a repeated name to `name.1`: keep the file's, checked later
        return df
    raise InputError(path, f"cannot decode as utf-8 or latin-1: {last}")  # pragma: no cover


def _raw_header(path: Path, sep: str, encoding: str) -> list[str] | None:
    if len(sep) != 1:
        return None
    try:
        with open(path, encoding=encoding, newline="") as f:
            return next(csv.reader(f, delimiter=sep, quotechar='"'))
    except (OSError, UnicodeDecodeError, StopIteration, csv.Error):
        return None


def _check_single_column(path: Path, name: str, sep: str) -> None:
    """One column whose name holds another separator: the file uses that one (e.g. a semicolon CSV)."""
    for other in (";", "\t", "|", ","):
        if other != sep and other in name and len(name.split(other)) > 1:
            raise InputError(
                path,
                f"the header has a single {_sep_name(sep)}-separated column '{name}': the file looks "
                f"{_sep_name(other)}-separated. Set the separator with csv_sep: {other!r} in the data config",
                row=1,
            )


def _sep_name(sep: str) -> str:
    return {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe"}.get(sep, repr(sep))


def _strip_type(name: str) -> str:
    name = name.strip().lstrip("\ufeff")
    m = _RECBOLE_HEADER.match(name)
    return m.group("name") if m else name


# ---------------------------------------------------------------------------------------------- generic
def _optional(df: pd.DataFrame, col: str | None, default: str | None) -> str | None:
    """An optional column is used if present; absent is fine only if the user did not name it explicitly."""
    if col is None:
        return None
    if col in df.columns:
        return col
    return None if col == default else col  # explicit name that is missing -> caller reports it


def read_interactions(path: str | Path, cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, str]]:
    cols = cfg.columns.interactions
    df = read_table(path, sep=cfg.csv_sep)
    wanted = {"user_id": cols.user_id, "item_id": cols.item_id, "timestamp": cols.timestamp}
    label_col = cols.label
    rating_col = _optional(df, cols.rating, "rating") if label_col is not None else cols.rating
    text_col = _optional(df, cols.text, None)
    if rating_col is not None:
        wanted["rating"] = rating_col
    if label_col is not None:
        wanted["label"] = label_col
    if text_col is not None:
        wanted["text"] = text_col
    hints = {"rating": "; for a log of 0/1 labels (clicks) instead of ratings, name that column with "
                       "columns.interactions.label"} if label_col is None else {}
    require_columns(df, path, "interactions", wanted, hints)
    out = pd.DataFrame(
        {
            "user_id": to_ids(df[cols.user_id], path, cols.user_id),
            "item_id": to_ids(df[cols.item_id], path, cols.item_id),
            "rating": to_float(df[rating_col], path, rating_col, "a numeric rating")
            if rating_col is not None
            else np.full(len(df), np.nan),
            "label": to_label(df[label_col], path, label_col)
            if label_col is not None
            else np.full(len(df), np.nan),
            "timestamp": to_timestamp(df[cols.timestamp], path, cols.timestamp, cfg.timestamp_format),
        }
    )
    if text_col is not None:
        out["text"] = to_text(df[text_col])
    out["_row"] = np.arange(1, len(df) + 1)
    return out, wanted


def read_items(path: str | Path, cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, str]]:
    cols = cfg.columns.items
    df = read_table(path, sep=cfg.csv_sep)
    wanted = {"item_id": cols.item_id, "title": cols.title}
    for key, default in (("genres", "genres"), ("year", None), ("text", None)):
        col = _optional(df, getattr(cols, key), default)
        if col is not None:
            wanted[key] = col
    require_columns(df, path, "items", wanted)
    years = (
        np.array([parse_year(v) for v in df[wanted["year"]].tolist()], dtype="float64")
        if "year" in wanted
        else np.full(len(df), np.nan)
    )
    titles = to_titles(df[cols.title], path, cols.title)
    out = pd.DataFrame(
        {
            "item_id": to_ids(df[cols.item_id], path, cols.item_id),
            "title": [render_title(t, y) for t, y in zip(titles, years, strict=True)],
            "genres": to_genres(df[wanted["genres"]], cfg.genre_sep)
            if "genres" in wanted
            else [[]] * len(df),
            "year": years,
        }
    )
    if "text" in wanted:
        out["text"] = to_text(df[wanted["text"]])
    out["_row"] = np.arange(1, len(df) + 1)
    if "genres" in wanted:
        check_genres(out["genres"].tolist(), path, wanted["genres"], cfg.genre_sep)
    return out, wanted


def check_genres(genres: list[list[str]], path: str | Path, col: str, sep: str) -> None:
    """Warn when the genre vocabulary looks like combinations split with the wrong ``genre_sep``."""
    vocab = {g for gs in genres for g in gs}
    n_items = max(len(genres), 1)
    parts: dict[str, set[str]] = {}
    for other in (" ", ",", ";", "/", "|"):
        if other != sep:
            parts[other] = {p.strip() for g in vocab for p in g.split(other) if p.strip()}
    combined = {o: p for o, p in parts.items() if sum(o in g for g in vocab) >= max(2, len(vocab) // 4)
                and len(p) < len(vocab)}
    too_many = len(vocab) > 50 and len(vocab) > 0.1 * n_items
    if combined or too_many:
        other = next(iter(combined), None)
        hint = "" if other is None else f" (they look {'space' if other == ' ' else _sep_name(other)}-separated)"
        log.warning(
            "%s, field '%s': %d distinct genres for %d items looks implausible%s; check genre_sep in the data "
            "config (now %r)", path, col, len(vocab), len(genres), hint, sep,
        )


def read_users(path: str | Path, cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, str]]:
    cols = cfg.columns.users
    df = read_table(path, sep=cfg.csv_sep)
    features = cols.features if cols.features is not None else [c for c in df.columns if c != cols.user_id]
    wanted = {"user_id": cols.user_id, **{f: f for f in features}}
    require_columns(df, path, "users", wanted)
    out = pd.DataFrame({"user_id": to_ids(df[cols.user_id], path, cols.user_id)})
    for f in features:
        if f in ("user_id", "user_idx", "_row"):
            raise InputError(path, f"user feature column may not be called '{f}' (reserved)", field=f)
        if f in cfg.bins:
            vals = pd.to_numeric(df[f].where(~df[f].map(is_missing), None), errors="coerce")
            bad = vals.isna().to_numpy() & ~df[f].map(is_missing).to_numpy()
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise InputError(
                    path,
                    f"expected a number (the column is bucketed by bins.{f}), got {df[f].iloc[i]!r}",
                    row=i + 1,
                    field=f,
                )
            out[f] = vals.astype("float64").to_numpy()
        else:
            out[f] = to_text(df[f])
    out["_row"] = np.arange(1, len(df) + 1)
    return out, wanted


def read_generic(
    interactions: str | Path, items: str | Path, users: str | Path | None, cfg: DataConfig
) -> RawTables:
    """Load the user's own logs with the column mapping of ``cfg.columns``."""
    inter, f_i = read_interactions(interactions, cfg)
    it, f_it = read_items(items, cfg)
    us, f_u = (None, {}) if users is None else read_users(users, cfg)
    files = {"interactions": str(interactions), "items": str(items)}
    if users is not None:
        files["users"] = str(users)
    src = "files: " + ", ".join(f"{k}={v}" for k, v in files.items())
    return RawTables(inter, it, us, src, files, {"interactions": f_i, "items": f_it, "users": f_u})


# ---------------------------------------------------------------------------------------------- cross-table
def check_tables(raw: RawTables) -> None:
    """Duplicate ids and references to unknown items/users, reported at the first offending row."""
    f_it = raw.fields.get("items", {})
    _no_duplicates(
        raw.items, "item_id", raw.files.get("items", "items"), f_it.get("item_id", "item_id"), "item"
    )
    if raw.users is not None:
        f_u = raw.fields.get("users", {})
        _no_duplicates(
            raw.users, "user_id", raw.files.get("users", "users"), f_u.get("user_id", "user_id"), "user"
        )
    inter = raw.interactions
    f_in = raw.fields.get("interactions", {})
    for key, table, noun in (("item_id", raw.items, "item"), ("user_id", raw.users, "user")):
        if table is None:
            continue
        known = inter[key].isin(set(table[key]))
        if not known.all():
            i = int(np.flatnonzero(~known.to_numpy())[0])
            n_bad = int((~known).sum())
            raise InputError(
                raw.files.get("interactions", "interactions"),
                f"{noun} id '{inter[key].iloc[i]}' is not in the {noun}s file "
                f"{raw.files.get(noun + 's', noun + 's')} ({n_bad} interaction(s) reference unknown {noun}s)",
                row=int(inter["_row"].iloc[i]),
                field=f_in.get(key, key),
            )


def _no_duplicates(df: pd.DataFrame, key: str, path: str, col: str, noun: str) -> None:
    dup = df[key].duplicated(keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        value = df[key].iloc[i]
        first = int(df["_row"].iloc[int(np.flatnonzero((df[key] == value).to_numpy())[0])])
        raise InputError(
            path,
            f"duplicate {noun} id '{value}' (first at row {first}); each {noun} must appear once",
            row=int(df["_row"].iloc[i]),
            field=col,
        )
