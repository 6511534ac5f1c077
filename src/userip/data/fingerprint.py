"""The data fingerprint: what every "built on the same data" check compares (profiles, bank, baselines, CTR,
serving).

Version 2 (``v2:`` + sha256) covers the id sets and every interaction's user, item, time, rating, label and
split; version 1 (DATA dirs written before it was recorded) covers the ids only.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd

from userip.data.split import SPLITS

FINGERPRINT_VERSION = 2
_FINGERPRINT_PREFIX = f"v{FINGERPRINT_VERSION}:"


def fingerprint_version(stats: dict[str, Any] | None) -> int:
    """The fingerprint definition a DATA dir's stats were written with (1 = ids only, before it was recorded)."""
    return int((stats or {}).get("fingerprint_version", 1))


def fingerprint_ids(user_map: dict[str, int] | list[str], item_map: dict[str, int] | list[str]) -> str:
    """Version 1: sha256 over the sorted user and item ids only (DATA dirs written before version 2)."""
    return _hash_ids(user_map, item_map).hexdigest()


def _hash_ids(user_map: dict[str, int] | list[str], item_map: dict[str, int] | list[str]) -> Any:
    h = hashlib.sha256()
    for name, ids in (("users", user_map), ("items", item_map)):
        h.update(f"{name}\n".encode())
        for s in sorted(str(i) for i in ids):
            h.update(s.encode("utf-8") + b"\n")
    return h


def fingerprint_data(user_map: dict[str, int], item_map: dict[str, int], interactions: pd.DataFrame) -> str:
    """Version 2: ``v2:`` + sha256 over the id sets and every interaction (user, item, timestamp, rating,
    label, split), in a canonical order so the input's row order does not matter.

    Dense indices stand for the ids: they are a fixed function of the id sets hashed first (`sorted_ids`).
    Review text is left out: it changes neither the split nor the labels that fits and banks depend on.
    """
    h = _hash_ids(user_map, item_map)
    inter = interactions
    split_code = pd.Categorical(inter["split"], categories=list(SPLITS)).codes.astype(np.int64)
    rating = inter["rating"].to_numpy(dtype="float64")
    cols = [
        inter["user_idx"].to_numpy(dtype=np.int64),
        inter["item_idx"].to_numpy(dtype=np.int64),
        inter["timestamp"].to_numpy(dtype=np.int64),
        np.where(np.isnan(rating), -1.0, rating).view(np.int64),  # one bit pattern for every missing rating
        inter["label"].to_numpy(dtype=np.int64),
        split_code,
    ]
    table = np.stack(cols, axis=1) if len(inter) else np.zeros((0, len(cols)), dtype=np.int64)
    order = np.lexsort(table.T[::-1])  # rows sorted by user, item, time, rating, label, split
    h.update(b"interactions\n")
    h.update(np.ascontiguousarray(table[order]).astype("<i8").tobytes())
    return _FINGERPRINT_PREFIX + h.hexdigest()


def fingerprint_mismatch(what: str, recorded: Any, data_fingerprint: str) -> str:
    """The message for "``what`` was built on other data", saying so when only the definition differs."""
    recorded = str(recorded)
    new_what, new_data = recorded.startswith(_FINGERPRINT_PREFIX), data_fingerprint.startswith(_FINGERPRINT_PREFIX)
    if new_data and not new_what:
        return (f"{what} was built by an older userip whose data fingerprint covered only the user and item ids "
                f"({recorded[:12]}), while this data's covers the split and labels too ({data_fingerprint[:15]}): "
                "userip cannot tell whether it was built on this split. Rebuild it from this data, or use the "
                "DATA directory it was built from")
    if new_what and not new_data:
        return (f"{what} records a split-and-label fingerprint ({recorded[:15]}), but this DATA directory was "
                f"prepared by an older userip (ids-only fingerprint {data_fingerprint[:12]}): use the DATA "
                "directory it was built from, or re-prepare this one (`userip data prepare ... --overwrite`)")
    return (f"{what} was built on other data: data fingerprint {recorded[:15]} != {data_fingerprint[:15]} of "
            "this data (other users, items, split or labels); rebuild it from this data")
