"""The DATA dir on disk: `write_prepared` and `load_prepared`.

The DATA dir is the only thing later stages read, so it is self-describing: the three tables, the id maps,
the split, the stats and the exact `DataConfig` that produced them. It is written with `userip.io.output_dir`
(built in a temp dir, moved in, then marked complete), so a crash never leaves a half-written directory
that a later stage could mistake for a complete one, and files userip did not write are never touched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from userip.data.config import DataConfig
from userip.data.fingerprint import FINGERPRINT_VERSION, fingerprint_version
from userip.data.prepared import PreparedData
from userip.data.split import SPLITS, resolve_cut
from userip.errors import InputError
from userip.io import OUTPUT_FILES, output_dir, read_json, read_yaml, require_complete, write_json, write_yaml

log = logging.getLogger(__name__)

DATA_FILES = OUTPUT_FILES["data"]
PathLike = str | os.PathLike


def write_prepared(data: PreparedData, out: PathLike, *, overwrite: bool = False) -> None:
    """Write all DATA files into a temp dir, moved into ``out`` only once everything is written."""
    split_info: dict[str, Any] = {
        "config": data.config.to_dict()["split"],
        "counts": {s: data.stats["splits"][s]["interactions"] for s in SPLITS},
        "users": {s: data.stats["splits"][s]["users"] for s in SPLITS},
    }
    if data.config.split.mode == "time":
        ts = data.interactions["timestamp"].to_numpy()
        cfg = data.config.split
        split_info["resolved_cuts"] = {
            "val_cut": resolve_cut(ts, cfg.val_cut) if cfg.val_cut is not None else None,
            "test_cut": resolve_cut(ts, cfg.test_cut),
        }
    with output_dir(out, "data", overwrite=overwrite) as tmp:
        data.interactions.to_parquet(tmp / "interactions.parquet", index=False)
        data.items.to_parquet(tmp / "items.parquet", index=False)
        data.users.to_parquet(tmp / "users.parquet", index=False)
        write_json(tmp / "id_maps.json", data.id_maps)
        write_json(tmp / "split.json", split_info)
        write_json(tmp / "stats.json", data.stats)
        write_yaml(tmp / "config.yaml", data.config.to_dict())


def load_prepared(path: PathLike) -> PreparedData:
    """Load a DATA dir written by `prepare`; a missing or incomplete dir is a clear `InputError`."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(
            path, "prepared data directory not found (run `userip data prepare --out DIR` first)"
        )
    require_complete(path, "prepared data")
    missing = [f for f in DATA_FILES if not (path / f).is_file()]
    if missing:
        raise InputError(path, f"incomplete prepared data directory: missing {', '.join(missing)}")
    try:
        inter = pd.read_parquet(path / "interactions.parquet")
        items = pd.read_parquet(path / "items.parquet")
        users = pd.read_parquet(path / "users.parquet")
    except Exception as e:
        raise InputError(path, f"cannot read prepared tables ({type(e).__name__}: {e})") from None
    items["genres"] = [[str(g) for g in gs] if gs is not None else [] for gs in items["genres"]]
    inter["split"] = inter["split"].astype(object)
    saved = read_yaml(path / "config.yaml") or {}
    saved.pop("windows", None)  # written by userip < 0.2, never read
    saved.pop("history_len", None)  # likewise (the CTR's is ctr.history_len)
    cfg = DataConfig.from_dict(saved, base=DataConfig())
    data = PreparedData(
        inter, items, users, read_json(path / "stats.json"), cfg, read_json(path / "id_maps.json"), path
    )
    version = fingerprint_version(data.stats)
    if version > FINGERPRINT_VERSION:
        raise InputError(path / "stats.json", f"fingerprint_version {version} is newer than this userip reads "
                         f"({FINGERPRINT_VERSION}); upgrade userip", field="fingerprint_version")
    if data.stats.get("fingerprint") != data.fingerprint:
        raise InputError(
            path / "stats.json",
            "fingerprint does not match id_maps.json and interactions.parquet (files from different runs?)",
            field="fingerprint",
        )
    if version < FINGERPRINT_VERSION:
        log.warning("%s: prepared by an older userip; its fingerprint covers only the user and item ids, so a "
                    "re-split copy of it would pass the 'built on the same data' checks. Re-prepare it (--overwrite) "
                    "for a fingerprint of the split and labels too, then rebuild what was built on it", path)
    return data
