"""A refit that keeps IDs meaningful: relabel the new fit's codes to match a previous PROFILES dir.

Called by ``fit_profiles(..., previous=DIR)`` after the fit and before the outputs are written. Users are matched
by their dataset ids (``user_id``), never by dense indices, which a re-export of a grown log may renumber. Only
labels change (see :mod:`userip.quantize.align`): the fitter's codebooks and codes are permuted together, so the
written codebooks, IDs and later ``profile infer`` calls stay consistent with each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.errors import UseripError
from userip.io import read_yaml


def read_previous(previous: str | Path) -> tuple[pd.DataFrame, dict[str, Any], Path]:
    """(IDs table, config.yaml, codebook file) of a previous PROFILES dir, with errors that name the file."""
    root = Path(previous)
    ids_path, conf_path, cb_path = root / "profile_ids.parquet", root / "config.yaml", root / "codebooks.safetensors"
    for p in (ids_path, conf_path, cb_path):
        if not p.is_file():
            raise UseripError(f"{p}: not found; --previous needs a fitted PROFILES directory")
    ids = pd.read_parquet(ids_path)
    if "user_id" not in ids.columns:
        raise UseripError(f"{ids_path}: missing column user_id")
    return ids, read_yaml(conf_path) or {}, cb_path


def align_to_previous(fitter: Any, previous: str | Path, user_ids: list[str], model_name: str) -> dict[str, Any]:
    """Relabel ``fitter``'s codebooks and codes in place to keep ``previous``'s IDs; returns the refit report.

    ``user_ids``: the dataset id of each of ``fitter.all_users`` (same order). Codeword similarity is offered to
    the matching only when both fits quantise the same space (same LLM and hidden size); see
    :func:`userip.quantize.match_codes` for why shared users come first.
    """
    from userip.quantize import apply_relabel, codebook_hash, load_codebooks, match_codes

    old_ids, old_conf, cb_path = read_previous(previous)
    old_codes = load_codebooks(cb_path)
    old_sizes = {p["name"]: int(p["codebook_size"]) for p in old_conf.get("profiles", [])}
    same_space = old_conf.get("model") == model_name and int(old_conf.get("hidden_size", -1)) == fitter.profiles.hidden
    by_user = old_ids.assign(user_id=old_ids["user_id"].astype(str)).set_index("user_id")
    users = [str(u) for u in user_ids]
    st = fitter.state
    report: dict[str, Any] = {"previous": str(previous), "previous_codebook_hash": codebook_hash(cb_path),
                              "same_space": bool(same_space), "profiles": {}}
    for k, p in enumerate(fitter.cfg.profiles):
        if p.name not in old_sizes or p.name not in by_user.columns or p.name not in old_codes:
            report["profiles"][p.name] = {"method": "none", "reason": "profile not in the previous fit"}
            continue
        old = by_user[p.name].reindex(users).fillna(0).to_numpy(dtype=np.int64)  # 0: user new in this fit
        new = st.z[fitter.all_users, k].numpy()
        cb = st.codebooks[p.name].detach()
        m = match_codes(old, new, old_sizes[p.name], p.codebook_size,
                        old_codes=old_codes[p.name] if same_space else None,
                        new_codes=cb.cpu() if same_space else None)
        st.codebooks[p.name], st.z[:, k] = apply_relabel(cb, st.z[:, k], m.relabel)
        report["profiles"][p.name] = {**m.as_dict(), "users": len(users), "new_users": int((old == 0).sum())}
    return report
