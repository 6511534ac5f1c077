"""Finding what a server loads from a CTR directory (the ``--out`` of ``userip ctr train``, or a run dir):
the training record, the model to serve, and the prepared data it was trained on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from userip.errors import UseripError


def read_json(path: Path) -> Any:
    """A JSON file; a `UseripError` naming it when it cannot be read."""
    from userip.io import read_json

    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise UseripError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from None


def training_record(ctr_dir: Path) -> tuple[Path, dict[str, Any]]:
    """``results.json`` of ``CTR/`` (or of a run dir's ``RUN/ctr/``) and the ``meta`` that training recorded
    there ({} when there is none); refuses a directory of an unreadable format, naming its version."""
    from userip.io import require_complete

    if not ctr_dir.is_dir():
        raise UseripError(f"{ctr_dir}: CTR directory not found (the --out dir of `userip ctr train`)")
    results = ctr_dir / "results.json"
    if not results.is_file() and (ctr_dir / "ctr" / "results.json").is_file():
        results = ctr_dir / "ctr" / "results.json"
    require_complete(results.parent, "a CTR model to serve")
    return results, dict(read_json(results).get("meta") or {}) if results.is_file() else {}


def models_dir(ctr_dir: Path) -> Path:
    """``CTR/models``; a run dir (``RUN/ctr/models``) is accepted too."""
    for d in (ctr_dir / "models", ctr_dir / "ctr" / "models"):
        if d.is_dir():
            return d
    raise UseripError(f"{ctr_dir}: no models/ directory here (expected the --out dir of `userip ctr train`)")


def choose_model(ctr_dir: Path, backbone: str | None) -> Path:
    """The model's ``.json``: ``backbone`` if given, else the first (by name) trained with profile IDs."""
    mdir = models_dir(ctr_dir)
    found: dict[str, dict] = {}
    for cfg_path in sorted(mdir.glob("*.json")):
        if cfg_path.with_suffix(".safetensors").is_file():
            found[cfg_path.stem] = read_json(cfg_path)
    if not found:
        raise UseripError(f"{mdir}: no trained models (<backbone>.safetensors + .json)")
    usable = [name for name, cfg in found.items() if cfg.get("variant") == "+ids"]
    listing = ", ".join(f"{n} ({c.get('variant')})" for n, c in found.items())
    if backbone is None:
        if not usable:
            raise UseripError(
                f"{mdir}: no model was trained with the profile IDs (variant '+ids'); found {listing}. "
                "Train with --variants including +ids"
            )
        return mdir / f"{usable[0]}.json"
    if backbone not in found:
        raise UseripError(f"{mdir}: no model for backbone '{backbone}'; found {listing}")
    if found[backbone].get("variant") != "+ids":
        raise UseripError(
            f"{mdir / backbone}.json: variant {found[backbone].get('variant')!r} does not read the profile IDs; "
            "serving needs a '+ids' model"
        )
    return mdir / f"{backbone}.json"


def resolve_data_dir(data_dir: str | os.PathLike | None, ctr_dir: Path, meta: dict) -> Path:
    """``--data`` if given, else the ``data`` recorded by ``train_ctr`` in results.json, else ``RUN/data``."""
    if data_dir is not None:
        return Path(data_dir)
    tried: list[Path] = []
    rec = meta.get("data")
    if rec:
        p = Path(rec)
        tried += [p] if p.is_absolute() else [p, ctr_dir.parent / p, ctr_dir / p]
    tried += [ctr_dir.parent / "data", ctr_dir / "data"]
    for c in tried:
        if (c / "stats.json").is_file():
            return c
    raise UseripError(
        f"cannot find the prepared data the CTR model was trained on (tried {', '.join(map(str, tried))}); "
        "pass --data"
    )


def load_trained_data(data_dir: str | os.PathLike | None, ctr_dir: Path, results: Path, meta: dict):
    """The prepared data the model was trained on (``resolve_data_dir``), refused if its fingerprint differs
    from the one training recorded."""
    from userip.data import load_prepared

    path = resolve_data_dir(data_dir, ctr_dir, meta)
    data = load_prepared(path)
    fp = meta.get("data_fingerprint")
    if fp and fp != data.fingerprint:
        from userip.data.prepared import fingerprint_mismatch

        raise UseripError(f"{path}: not the data the CTR model was trained on: "
                          + fingerprint_mismatch(f"the CTR model ({results})", fp, data.fingerprint))
    return path, data
