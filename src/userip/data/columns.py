"""One column of a user's table as canonical values: ids, numbers, timestamps, 0/1 labels, genres, titles, text.

Every bad value is one `InputError` naming the file, the 1-based data row and the column, plus what was
expected, so the user can fix the file from the message alone.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.errors import InputError


def require_columns(
    df: pd.DataFrame, path: str | Path, table: str, wanted: dict[str, str], hints: dict[str, str] | None = None
) -> None:
    """``wanted``: canonical key -> column name. Missing ones are reported with the columns that do exist."""
    for key, col in wanted.items():
        if col not in df.columns:
            raise InputError(
                path,
                f"missing {table} column '{col}' (used as {key}); "
                f"columns present: {', '.join(map(str, df.columns))}."
                f" Map it with columns.{table}.{key} in the config" + (hints or {}).get(key, ""),
                field=col,
            )


def is_missing(v: Any) -> bool:
    """None, NaN, a blank string, pd.NA or NaT."""
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    return v is pd.NA or v is pd.NaT


def to_ids(s: pd.Series, path: str | Path, col: str) -> pd.Series:
    """Ids as clean strings (integral floats from Parquet become "12", not "12.0"); empty ids are errors."""
    out = []
    for i, v in enumerate(s.tolist()):
        if is_missing(v):
            raise InputError(path, "empty id (expected a non-empty id)", row=i + 1, field=col)
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            v = int(v)
        out.append(str(v).strip())
    return pd.Series(out, index=s.index, dtype=object)


def to_float(s: pd.Series, path: str | Path, col: str, what: str = "a number") -> np.ndarray:
    num = pd.to_numeric(s, errors="coerce")
    arr = np.asarray(num, dtype="float64")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(path, f"expected {what}, got {s.iloc[i]!r}", row=i + 1, field=col)
    return arr


def to_timestamp(s: pd.Series, path: str | Path, col: str, fmt: str) -> np.ndarray:
    """Seconds since the epoch (int64). Parquet datetimes are converted; strings need fmt='datetime'."""
    if pd.api.types.is_datetime64_any_dtype(s):
        if s.isna().any():
            i = int(np.flatnonzero(s.isna().to_numpy())[0])
            raise InputError(path, "empty timestamp (expected a date-time)", row=i + 1, field=col)
        return _dt_to_seconds(s)
    if fmt == "datetime":
        parsed = pd.to_datetime(s, errors="coerce", utc=True, format="ISO8601")
        if parsed.isna().any():
            i = int(np.flatnonzero(parsed.isna().to_numpy())[0])
            raise InputError(path, f"expected an ISO date-time, got {s.iloc[i]!r}", row=i + 1, field=col)
        return _dt_to_seconds(parsed)
    arr = to_float(
        s, path, col, "a numeric timestamp (seconds since 1970; set timestamp_format: datetime for dates)"
    )
    return np.floor(arr).astype("int64")


def _dt_to_seconds(s: pd.Series) -> np.ndarray:
    if getattr(s.dt, "tz", None) is None:
        s = s.dt.tz_localize("UTC")
    return (s - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy().astype("int64")


def to_label(s: pd.Series, path: str | Path, col: str) -> np.ndarray:
    if s.dtype == bool:
        return s.to_numpy().astype("float64")
    arr = to_float(s, path, col, "a 0/1 label")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(path, f"expected a 0/1 label, got {s.iloc[i]!r}", row=i + 1, field=col)
    return arr


def to_genres(s: pd.Series, sep: str) -> list[list[str]]:
    """A list column (Parquet) or a delimited string; order kept, blanks and duplicates dropped."""
    out = []
    for v in s.tolist():
        if isinstance(v, (list, tuple, np.ndarray)):
            parts = [str(x) for x in v if not is_missing(x)]
        elif is_missing(v):
            parts = []
        else:
            parts = str(v).split(sep)
        seen: dict[str, None] = {}
        for p in parts:
            p = p.strip()
            if p:
                seen.setdefault(p, None)
        out.append(list(seen))
    return out


def to_text(s: pd.Series) -> list[str | None]:
    return [None if is_missing(v) else str(v) for v in s.tolist()]


def parse_year(v: Any) -> float:
    """A 4-digit year from a year or a date-ish value ("1995", 1995.0, "01-Jan-1995"); NaN if none."""
    if is_missing(v):
        return float("nan")
    if isinstance(v, (int, float, np.integer, np.floating)):
        y = float(v)
        return y if y.is_integer() and 1000 <= y <= 9999 else float("nan")
    m = re.search(r"(?<!\d)(\d{4})(?!\d)", str(v))
    return float(m.group(1)) if m else float("nan")


def render_title(title: str, year: float) -> str:
    """'Toy Story' + 1995 -> 'Toy Story (1995)'; unknown year or already suffixed -> title unchanged."""
    if math.isnan(year):
        return title
    suffix = f"({int(year)})"
    return title if title.rstrip().endswith(suffix) else f"{title} {suffix}"


def to_titles(s: pd.Series, path: str | Path, col: str) -> list[str]:
    out = []
    for i, v in enumerate(s.tolist()):
        if is_missing(v):
            raise InputError(
                path, "empty title (every item needs a title: it is what the LLM reads)", row=i + 1, field=col
            )
        out.append(" ".join(str(v).split()))
    return out
