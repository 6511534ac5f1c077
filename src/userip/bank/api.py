"""Entry points of the bank stage: URL dispatch, building from a PROFILES dir, Parquet import.

Kept apart from the backends: a location is a SQLite path / ``sqlite:///path`` or a Redis URL
``redis://host:port/db?name=bank`` (``redis_backend``); callers only ever see ``FeatureBank``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from userip.bank.protocol import (
    PARQUET_META_KEY,
    FeatureBank,
    normalise_meta,
    validate_ids_table,
)
from userip.errors import InputError, UseripError
from userip.io import require_complete, sha256_file

__all__ = ["build_bank", "delete_users", "forget_users", "import_parquet", "open_bank", "read_profiles_dir"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_SUPPORTED = "a file path, sqlite:///path or redis://host:port/db[?name=bank]"


def _backend_for(url_or_path: str | os.PathLike) -> tuple[str, str]:
    """Split a bank location into (backend, backend-specific location)."""
    if isinstance(url_or_path, os.PathLike):
        return "sqlite", os.fspath(url_or_path)
    if not isinstance(url_or_path, str) or not url_or_path.strip():
        raise UseripError(f"bank location must be {_SUPPORTED}, got {url_or_path!r}")
    m = _SCHEME.match(url_or_path)
    if m is None:
        return "sqlite", url_or_path
    scheme = m.group(1).lower()
    if scheme == "sqlite":
        # SQLAlchemy convention: sqlite:///relative/path, sqlite:////absolute/path.
        rest = url_or_path[m.end() :]
        if not rest.startswith("/") or len(rest) == 1:
            raise UseripError(
                f"bad SQLite bank URL {url_or_path!r}: use sqlite:///relative/path or sqlite:////abs/path"
            )
        return "sqlite", rest[1:]
    if scheme == "redis":
        return "redis", url_or_path
    raise UseripError(f"unknown feature-bank scheme '{scheme}://' in {url_or_path!r}; expected {_SUPPORTED}")


def open_bank(url_or_path: str | os.PathLike, *, create: bool = False, reload: bool = True) -> FeatureBank:
    """Open a bank for reading (or, with ``create=True``, a not-yet-built one for ``build``).

    ``reload``: pick up rebuilds of the same location on the next ``get`` (what a long-running server wants).
    """
    backend, location = _backend_for(url_or_path)
    if backend == "sqlite":
        from userip.bank.sqlite import SQLiteBank

        return SQLiteBank(location, create=create, reload=reload)
    if backend == "redis":
        from userip.bank.redis_backend import RedisBank

        return RedisBank(location, create=create, reload=reload)
    raise AssertionError(backend)  # pragma: no cover - _backend_for only returns known backends



def _safetensors_shapes(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Tensor shapes and the file's metadata, read from the header only (no tensor data is loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "np") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 - not iterable
    except (SafetensorError, OSError) as e:
        raise InputError(path, f"not a readable safetensors file ({e})") from None


def read_profiles_dir(profiles_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Load and check a PROFILES dir; returns (ids table, bank meta). Every error names the file and field.

    The codebooks are hashed into the meta: IDs are only meaningful with the codebook that produced them,
    so a server can refuse a bank whose codebook differs from the one its CTR model was trained with.
    """
    root = Path(profiles_dir)
    if not root.is_dir():
        raise UseripError(f"{root}: profiles directory not found (expected the output of `userip profile`)")
    require_complete(root, "profiles for a bank")
    ids_path, cfg_path, cb_path = (
        root / "profile_ids.parquet",
        root / "config.yaml",
        root / "codebooks.safetensors",
    )
    for p in (ids_path, cfg_path, cb_path):
        if not p.is_file():
            raise InputError(p, "file missing from the profiles directory")

    import yaml

    try:
        config = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as e:
        raise InputError(cfg_path, f"not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise InputError(cfg_path, "expected a mapping at the top level")
    for key in ("model", "template", "profiles", "data_fingerprint"):
        if config.get(key) in (None, ""):
            raise InputError(cfg_path, "missing", field=key)
    profiles = config["profiles"]
    if not isinstance(profiles, list) or not profiles:
        raise InputError(
            cfg_path, "must be a non-empty list of {name, n_tokens, codebook_size}", field="profiles"
        )
    meta_profiles = []
    for i, p in enumerate(profiles):
        if not isinstance(p, dict) or "name" not in p:
            raise InputError(cfg_path, f"entry {i} needs a 'name'", field="profiles")
        if "codebook_size" not in p:
            raise InputError(
                cfg_path, f"profile '{p['name']}' has no codebook_size", field="profiles.codebook_size"
            )
        meta_profiles.append({"name": p["name"], "size": p["codebook_size"]})
    meta = normalise_meta(
        {
            "model": str(config["model"]),
            "template": str(config["template"]),
            "codebook_hash": sha256_file(cb_path),
            "profiles": meta_profiles,
            "data_fingerprint": str(config["data_fingerprint"]),
        },
        source=cfg_path,
    )

    shapes, cb_meta = _safetensors_shapes(cb_path)
    # lineage of a refit (`profile fit --previous`): the codebooks whose IDs these were relabelled to keep.
    # Serving still refuses a bank whose codebook_hash differs from the CTR model's (the refit keeps IDs only
    # where the clusters allow); the record tells an operator which bank this one replaces.
    previous = cb_meta.get("previous_codebook_hash")
    if previous:
        meta["codebook_previous_hash"] = str(previous)
    for p in meta["profiles"]:
        key = f"codebook.{p['name']}"
        if key not in shapes:
            raise InputError(cb_path, f"missing tensor for profile '{p['name']}'", field=key)
        shape = shapes[key]
        if not shape or shape[0] != p["size"]:
            raise InputError(
                cb_path, f"has shape {shape}, but config.yaml says codebook_size {p['size']}", field=key
            )

    try:
        table = pd.read_parquet(ids_path)
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise InputError(ids_path, f"cannot read Parquet ({type(e).__name__}: {e})") from None
    validate_ids_table(table, meta, source=ids_path)
    return table, meta


def _build_into(out: str | os.PathLike, table: pd.DataFrame, meta: dict[str, Any]) -> FeatureBank:
    """Open (creating) the bank at ``out``, build it atomically, return it open; closed again on failure."""
    bank = open_bank(out, create=True)
    try:
        bank.build(table, meta)
    except BaseException:
        bank.close()
        raise
    return bank


def build_bank(profiles_dir: str | os.PathLike, out: str | os.PathLike) -> FeatureBank:
    """Build (or atomically rebuild) the bank at ``out`` from a PROFILES dir; returns it opened."""
    table, meta = read_profiles_dir(profiles_dir)
    return _build_into(out, table, meta)


def import_parquet(
    path: str | os.PathLike, out: str | os.PathLike, meta: dict[str, Any] | None = None
) -> FeatureBank:
    """Build a bank from a Parquet table (e.g. one written by ``export_parquet``, or another backend's dump).

    ``meta=None`` takes the meta stored in the file by ``export_parquet``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        table = pf.read().to_pandas()
    except Exception as e:  # see read_profiles_dir
        raise InputError(path, f"cannot read Parquet ({type(e).__name__}: {e})") from None
    if meta is None:
        raw = (pf.schema_arrow.metadata or {}).get(PARQUET_META_KEY)
        if raw is None:
            raise InputError(
                path, "no bank meta stored in the file; pass meta=", field=PARQUET_META_KEY.decode()
            )
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise InputError(
                path, f"stored bank meta is not JSON ({e})", field=PARQUET_META_KEY.decode()
            ) from None
    meta = normalise_meta(meta, source=path)
    validate_ids_table(table, meta, source=path)
    return _build_into(out, table, meta)


def delete_users(bank: str | os.PathLike, user_ids: list[str]) -> list[str]:
    """Remove these users' rows from the bank (an atomic rebuild: readers see the old or the new bank, never
    half of one); afterwards they are unknown users (ID 0). Returns the ids that were there (in input order);
    ids the bank does not hold are left as they are (nothing to delete)."""
    ids = [str(u) for u in user_ids]
    with open_bank(bank) as b:
        table = b.to_frame()
        present = set(table["user_id"].astype(str))
        found = [u for u in dict.fromkeys(ids) if u in present]
        if found:
            keep = table[~table["user_id"].astype(str).isin(found)].reset_index(drop=True)
            b.build(keep, b.meta())
    return found


def forget_users(profiles_dir: str | os.PathLike, user_ids: list[str], data_dir: str | os.PathLike | None = None,
                 *, llm: Any = None) -> int:
    """Remove these users' pooled history states from userip's cache (``~/.cache/userip/pooled``).

    The cache is content-addressed by the user's rendered window tokens, so the windows are rebuilt exactly as
    the fit in ``profiles_dir`` rendered them (its config, tokenizer and DATA dir, or ``data_dir``). Returns
    the number of cache entries removed. Ids absent from the data are a `UseripError` naming them.
    """
    import dataclasses

    from userip.data import load_prepared
    from userip.io import read_yaml
    from userip.profile import ProfileConfig
    from userip.profile.api import build_corpus
    from userip.profile.pooled import PooledStates

    root = Path(profiles_dir)
    conf = read_yaml(root / "config.yaml") if (root / "config.yaml").is_file() else None
    if not conf or "profile" not in conf:
        raise UseripError(f"{root}/config.yaml: not a fitted PROFILES directory (needs its profile config)")
    data_dir = data_dir or conf.get("data_dir")
    if not data_dir:
        raise UseripError(f"{root}/config.yaml records no data_dir: pass the data directory (--data)")
    data = load_prepared(data_dir)
    idx = data.user_index([str(u) for u in user_ids])
    missing = [u for u, i in zip(user_ids, idx, strict=True) if i == 0]
    if missing:
        raise UseripError(f"{data_dir}: unknown user ids {missing[:10]}: their cached states cannot be found "
                          "without their behaviour")
    cfg = ProfileConfig.from_dict(conf["profile"]).replace(max_users=0)
    if llm is None:
        from userip.llm import load_llm

        llm = load_llm(conf["model"], dtype=cfg.dtype, device="cpu")
    inter = data.interactions  # only these users are rendered: a user's windows depend on their rows alone
    mine = dataclasses.replace(data, interactions=inter[inter["user_idx"].isin(idx.tolist())])
    corpus = build_corpus(mine, llm.tokenizer, cfg)
    cap = cfg.history_windows
    removed = 0
    # the encoder and the history baseline read the most recent `history_windows`; forget the full list too
    for windows in ({u: w[-cap:] for u, w in corpus.train.items()} if cap else {}, dict(corpus.train)):
        if windows:
            removed += PooledStates.forget(windows)
    return removed
