"""Backend-neutral part of the feature bank: the protocol every backend implements, and the shared checks.

Every backend (SQLite, Redis) stores the same thing: ``user_id (str) -> one int ID per profile``,
plus a JSON meta dict. Validation lives here, not in the backends, so a table that one backend accepts is
accepted by every backend, with the same error messages.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from userip import __version__
from userip.errors import InputError, UseripError

__all__ = [
    "BANK_FORMAT_VERSION",
    "PARQUET_META_KEY",
    "FeatureBank",
    "check_compatible",
    "finalize_meta",
    "normalise_meta",
    "validate_ids_table",
    "write_parquet",
]

#: Bumped when the stored layout changes; a reader refuses banks with a newer version.
BANK_FORMAT_VERSION = 1
#: Key under which an exported Parquet file keeps the bank meta (JSON), so an import can restore it.
PARQUET_META_KEY = b"userip.bank.meta"


@runtime_checkable
class FeatureBank(Protocol):
    """Maps dataset user ids to profile IDs, for a CTR model that must not call an LLM online.

    Output of ``get`` is int64 ``[n, m]`` with columns in ``profile_names`` order; 0 means "unknown user"
    (the embedding tables reserve index 0 for that), so a cold user never raises at serving time.
    """

    @property
    def profile_names(self) -> list[str]:
        """Profile names, in the column order of ``get``."""
        ...

    def build(self, ids_table: pd.DataFrame, meta: dict[str, Any]) -> None:
        """Replace the bank's content atomically with ``ids_table`` (``user_id`` + one column per profile)."""
        ...

    def get(self, user_ids: Sequence[str]) -> np.ndarray:
        """Batched lookup: int64 ``[len(user_ids), m]``, input order, duplicates allowed, unknown -> 0."""
        ...

    def meta(self) -> dict[str, Any]:
        """A copy of the bank meta (model, template, codebook_hash, profiles, data_fingerprint, ...)."""
        ...

    def to_frame(self) -> pd.DataFrame:
        """The whole bank as ``user_id`` + one int64 column per profile, sorted by ``user_id``."""
        ...

    def code_counts(self) -> dict[str, dict[int, int]]:
        """Per profile, how many users hold each code (for ``userip bank info`` and sanity checks)."""
        ...

    def export_parquet(self, path: str | os.PathLike) -> None:
        """Write the bank (with its meta in the file's schema metadata) to Parquet."""
        ...

    def close(self) -> None:
        """Release connections; the object is unusable afterwards."""
        ...

    def __enter__(self) -> FeatureBank: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def normalise_meta(meta: dict[str, Any], *, source: object = "meta") -> dict[str, Any]:
    """Check the caller-supplied meta and return a clean copy.

    ``profiles`` fixes the column order and each codebook size K (IDs must lie in 0..K);
    ``data_fingerprint`` is what ``check_compatible`` compares, so both are required.
    """
    if not isinstance(meta, dict):
        raise UseripError(f"{source}: bank meta must be a dict, got {type(meta).__name__}")
    profiles = meta.get("profiles")
    if not isinstance(profiles, list) or not profiles:
        raise InputError(source, "must be a non-empty list of {name, size}", field="profiles")
    clean_profiles: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, p in enumerate(profiles):
        if not isinstance(p, dict):
            raise InputError(source, f"entry {i} must be a mapping with 'name' and 'size'", field="profiles")
        name = p.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(source, f"entry {i} needs a non-empty string 'name'", field="profiles")
        if name in seen:
            raise InputError(source, f"profile name '{name}' appears twice", field="profiles")
        seen.add(name)
        size = p.get("size", p.get("codebook_size"))
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < 1:
            raise InputError(
                source, f"profile '{name}' needs an integer size >= 1, got {size!r}", field="profiles"
            )
        clean_profiles.append({"name": name, "size": int(size)})
    fp = meta.get("data_fingerprint")
    if not isinstance(fp, str) or not fp:
        raise InputError(
            source, "missing or empty (needed to detect a bank built on other data)", field="data_fingerprint"
        )
    out = copy.deepcopy(meta)
    out["profiles"] = clean_profiles
    for key in ("model", "template", "codebook_hash"):
        out.setdefault(key, None)
    return out


def validate_ids_table(
    ids_table: pd.DataFrame, meta: dict[str, Any], *, source: object = "ids_table"
) -> None:
    """Refuse tables that would silently serve wrong features: bad ids, duplicates, out-of-range codes.

    ``meta`` must already be normalised. Extra columns (e.g. ``user_idx``) are ignored.
    """
    if not isinstance(ids_table, pd.DataFrame):
        raise UseripError(f"{source}: expected a pandas DataFrame, got {type(ids_table).__name__}")
    if "user_id" not in ids_table.columns:
        raise InputError(source, "missing column", field="user_id")
    uid = ids_table["user_id"]
    if uid.isna().any():
        row = int(np.flatnonzero(uid.isna().to_numpy())[0])
        raise InputError(source, "user ids must not be null", row=row, field="user_id")
    if not all(isinstance(u, str) for u in uid.tolist()):
        raise InputError(
            source,
            f"user ids must be strings (dataset ids cross the bank as strings), got dtype {uid.dtype}",
            field="user_id",
        )
    dup = uid.duplicated(keep=False)
    if dup.any():
        examples = list(dict.fromkeys(uid[dup].tolist()))[:5]
        raise InputError(
            source, f"{int(uid[dup].nunique())} duplicate user ids, e.g. {examples}", field="user_id"
        )
    for p in meta["profiles"]:
        name, size = p["name"], p["size"]
        if name not in ids_table.columns:
            raise InputError(source, f"missing column for profile '{name}'", field=name)
        col = ids_table[name]
        if col.isna().any():
            row = int(np.flatnonzero(col.isna().to_numpy())[0])
            raise InputError(source, "profile IDs must not be null", row=row, field=name)
        if not pd.api.types.is_integer_dtype(col) or pd.api.types.is_bool_dtype(col):
            raise InputError(source, f"profile IDs must be integers, got dtype {col.dtype}", field=name)
        values = col.to_numpy(dtype=np.int64)
        bad = (values < 0) | (values > size)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(
                source, f"ID {int(values[row])} outside 0..{size} (codebook size {size})", row=row, field=name
            )


def finalize_meta(meta: dict[str, Any], *, n_users: int, backend: str) -> dict[str, Any]:
    """Add the fields a backend fills in at build time (they describe this bank, not its inputs)."""
    out = copy.deepcopy(meta)
    out["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out["n_users"] = int(n_users)
    out["backend"] = backend
    out["version"] = BANK_FORMAT_VERSION
    out["userip_version"] = __version__
    return out


def check_compatible(bank_meta: dict[str, Any], data_fingerprint: str) -> None:
    """Fail loudly when a bank was built on another dataset (or split): its user-id maps differ, so IDs are wrong."""
    from userip.data.prepared import fingerprint_mismatch

    have = bank_meta.get("data_fingerprint") if isinstance(bank_meta, dict) else None
    if have != data_fingerprint:
        raise UseripError(fingerprint_mismatch("the bank", have, data_fingerprint)
                          + " (rebuild the bank from profiles fitted on this data)")


def write_parquet(frame: pd.DataFrame, meta: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``frame`` with ``meta`` in the schema metadata, atomically (a reader never sees half a file)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from userip.io import atomic_path

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), PARQUET_META_KEY: json.dumps(meta).encode()}
    )
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)
