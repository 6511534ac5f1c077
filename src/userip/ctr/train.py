"""The CTR stage from files: prepared data, a feature bank, and optionally profiles and saved baselines.

:func:`train_ctr` reads them into the arrays :func:`userip.ctr.run.run_ctr_table` takes and writes the table to
``OUT``. :func:`read_bank_ids` is how a bank is read for CTR rows (here and in the FuxiCTR export): every user's
profile IDs by user_idx, from a bank built on the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from userip.ctr import variants as V
from userip.ctr.models import get_backbone
from userip.ctr.run import SETTINGS, run_ctr_table
from userip.ctr.sources import label_rate
from userip.data.prepared import fingerprint_mismatch
from userip.errors import UseripError
from userip.io import check_format

DEFAULT_BACKBONES = ("dcn", "deepfm", "dcnv2", "autoint", "din")


# ------------------------------------------------------------------ the feature bank
@dataclass
class BankIDs:
    ids: np.ndarray  # [n_users+1, m] int64, row = user_idx (row 0 and users the bank lacks: 0, unknown)
    names: list[str]  # the profile names, one per column ([] when the bank names none)
    sizes: list[int]  # the codebook size per column
    meta: dict  # the bank's meta (data_fingerprint, codebook_hash, profiles, ...)


def read_bank_ids(bank: str | Path, data) -> BankIDs:
    """Every user's profile IDs from the feature bank at ``bank`` (path or URL), by user_idx of the prepared
    ``data``. A bank built on other data is refused (:func:`userip.bank.check_compatible`); the bank is closed
    again before this returns."""
    from userip.bank import check_compatible, open_bank

    with open_bank(bank) as fb:
        meta = dict(fb.meta() or {})
        try:
            check_compatible(meta, data.fingerprint)
        except UseripError as e:
            raise UseripError(f"{bank}: {e}") from None
        names = list(getattr(fb, "profile_names", None) or [])
        users = data.users.sort_values("user_idx")
        got = np.asarray(fb.get([str(u) for u in users["user_id"]]), dtype=np.int64)
    if got.ndim != 2 or got.shape[0] != len(users) or (names and got.shape[1] != len(names)):
        raise UseripError(f"bank {bank}: get() returned shape {got.shape} for {len(users)} users and "
                          f"{len(names)} profiles")
    ids = np.zeros((int(data.n_users) + 1, got.shape[1]), dtype=np.int64)
    ids[users["user_idx"].to_numpy(dtype=np.int64)] = got
    return BankIDs(ids, names, _id_sizes(meta, names, ids), meta)


def _id_sizes(bank_meta: dict, names: list[str], ids: np.ndarray) -> list[int]:
    """Codebook sizes from the bank meta (``profiles: [{name, size}]``), else the largest ID seen per column."""
    profiles = bank_meta.get("profiles")
    if isinstance(profiles, list) and profiles and all(isinstance(p, dict) for p in profiles):
        by_name = {p.get("name"): p.get("size", p.get("codebook_size")) for p in profiles}
        sizes = [by_name.get(n) for n in names] if names else list(by_name.values())
        if len(sizes) == ids.shape[1] and all(isinstance(s, int | np.integer) for s in sizes):
            return [int(s) for s in sizes]
    return [max(1, int(c)) for c in ids.max(axis=0)]


# ------------------------------------------------------------------ profiles, baselines, label rates
def load_personal(profiles_dir: Path, n_user_rows: int, data_fp: str | None) -> np.ndarray:
    """The personal soft tokens ``[n_users+1, ...]`` of a PROFILES dir (``+theta``); profiles fitted on other
    data are refused."""
    from safetensors.numpy import load_file

    check_format(profiles_dir, "profiles")  # a newer format is named before anything is read
    f = Path(profiles_dir) / "profiles.safetensors"
    if not f.exists():
        raise UseripError(f"--profiles {profiles_dir}: no profiles.safetensors there")
    cfg_file = Path(profiles_dir) / "config.yaml"
    if cfg_file.exists() and data_fp is not None:
        from userip.io import read_yaml

        fp = (read_yaml(cfg_file) or {}).get("data_fingerprint")
        if fp is not None and fp != data_fp:
            raise UseripError(fingerprint_mismatch(f"profiles {profiles_dir}", fp, data_fp))
    tensors = load_file(str(f))
    key = "personal" if "personal" in tensors else "theta" if "theta" in tensors else None
    if key is None:
        raise UseripError(f"{f}: has neither 'personal' nor 'theta' (found {sorted(tensors)})")
    arr = tensors[key]
    if arr.shape[0] != n_user_rows:
        raise UseripError(f"{f}: '{key}' has {arr.shape[0]} rows, the data has n_users+1 = {n_user_rows}")
    return arr.astype(np.float32)


# baseline name (BaselineFeatures.name) -> the variant prefix its sources get, and whether its vector is a source
BASELINE_SOURCES = {"history": ("hist", True), "text-profile": ("text", True), "content-kmeans": ("content", False)}


def baseline_sources(dirs: Sequence[str | Path], n_user_rows: int, *, dense: bool = True,
                     data_fingerprint: str | None = None) -> tuple[dict, dict, dict[str, str]]:
    """Saved baselines (``userip.baselines.save_baseline`` dirs) as extra sources of the table:
    ``(extra_ids, extra_dense, reads)`` with ``+hist-ids``, ``+hist-dense``, ``+text-ids``, ``+text-dense``,
    ``+content-ids`` (``dense=False``: IDs only). A baseline fitted on other data is refused."""
    from userip.baselines import load_baseline

    extra_ids: dict[str, tuple[np.ndarray, list[int]]] = {}
    extra_dense: dict[str, np.ndarray] = {}
    reads: dict[str, str] = {}
    for d in dirs:
        f = load_baseline(d)
        fp = f.meta.get("data_fingerprint")
        if data_fingerprint is not None and fp not in (None, data_fingerprint):
            raise UseripError(fingerprint_mismatch(f"baseline {d}", fp, data_fingerprint))
        prefix, with_dense = BASELINE_SOURCES.get(f.name, (f.name, True))
        cards = f.cardinalities or {c: int(f.ids[c].max()) for c in f.ids.columns[2:]}
        table = np.zeros((n_user_rows, len(cards)), dtype=np.int64)
        idx = f.ids["user_idx"].to_numpy(dtype=np.int64)
        if len(idx) and idx.max() >= n_user_rows:
            raise UseripError(f"baseline {d}: user_idx {idx.max()} beyond the data's {n_user_rows - 1} users")
        for j, col in enumerate(cards):
            table[idx, j] = f.ids[col].to_numpy(dtype=np.int64)
        what = str(f.meta.get("reads") or f.name)
        extra_ids[f"+{prefix}-ids"] = (table, list(cards.values()))
        reads[f"+{prefix}-ids"] = f"{what}; k-means IDs ({' x '.join(map(str, cards.values()))})"
        if dense and with_dense:
            if f.dense.shape[0] != n_user_rows:
                raise UseripError(f"baseline {d}: dense has {f.dense.shape[0]} rows, the data has n_users+1 = "
                                  f"{n_user_rows}")
            extra_dense[f"+{prefix}-dense"] = f.dense
            reads[f"+{prefix}-dense"] = f"{what}; the vector ({f.dense.shape[1]} dims)"
    return extra_ids, extra_dense, reads


def user_label_rates(data) -> tuple[np.ndarray, str]:
    """Per user_idx, the train mean rating (the train label rate where the log has no rating), NaN for users
    without train rows, and which of the two it is. Train split only: nothing of val/test enters."""
    inter = data.interactions
    tr = inter[inter["split"] == "train"]
    n_user_rows = int(data.n_users) + 1
    rating = tr["rating"].to_numpy(dtype=np.float64) if "rating" in tr else np.full(len(tr), np.nan)
    if len(tr) and np.isfinite(rating).all():
        return label_rate(tr["user_idx"].to_numpy(), rating, n_user_rows), "train mean rating"
    return label_rate(tr["user_idx"].to_numpy(), tr["label"].to_numpy(), n_user_rows), "train label rate"


def _profiles_read(profiles_dir: Path | None) -> str:
    """What the profiles read, from PROFILES/config.yaml (behaviour rendering and inference)."""
    from userip.io import read_yaml

    f = Path(profiles_dir) / "config.yaml" if profiles_dir is not None else None
    conf = (read_yaml(f) or {}) if f is not None and f.exists() else {}
    p = conf.get("profile") or {}
    if not p:
        return "the profiles"
    from userip.baselines.features import describe_behaviour

    return f"{describe_behaviour(p)}; {p.get('inference', 'em')} profile inference"


def train_ctr(
    data_dir: str | Path,
    bank: str | Path,
    profiles_dir: str | Path | None = None,
    *,
    backbones: Sequence[str] | str = DEFAULT_BACKBONES,
    seeds: int | Sequence[int] = 5,
    out: str | Path,
    variants: Sequence[str] | str | None = None,
    settings: Sequence[str] | str = SETTINGS,
    history_len: int = 20,
    baselines: Sequence[str | Path] = (),
    baseline_dense: bool = True,
    overwrite: bool = False,
    **kwargs,
) -> pd.DataFrame:
    """Run the CTR table on prepared data with IDs from a feature bank; writes ``OUT/results.{json,md}``,
    ``OUT/predictions.npz`` and ``OUT/models/``. ``kwargs`` go to :func:`run_ctr_table` (lr, batch_size,
    max_epochs, bootstrap, competitor, ...).

    ``profiles_dir`` adds ``+theta`` (the personal soft tokens); ``baselines`` (saved baseline dirs, e.g.
    ``RUN/baselines/history``) add their sources (``+hist-ids``, ``+hist-dense``, ...; ``baseline_dense=False``:
    IDs only). ``+label-rate`` reads the train mean rating (train label rate for a 0/1 log).

    ``out`` must be new, empty or a CTR dir userip wrote; a finished one is replaced only with
    ``overwrite=True`` (its results and models are removed first; other files are never touched). An unfinished
    one (a killed table) is continued, with or without ``overwrite``: each backbone it finished on the same
    inputs is taken over, the rest are fit."""
    from userip.data import ctr_examples, load_prepared
    from userip.io import claim_output_dir, read_marker

    data = load_prepared(data_dir)
    data_fp = getattr(data, "fingerprint", None)
    bank_ids = read_bank_ids(bank, data)
    names = bank_ids.names or None
    n_user_rows = int(data.n_users) + 1

    train, val, test = (ctr_examples(data, s, history_len=history_len) for s in ("train", "val", "test"))
    activity = np.bincount(np.asarray(train.user, dtype=np.int64), minlength=n_user_rows)[:n_user_rows]
    theta = load_personal(Path(profiles_dir), n_user_rows, data_fp) if profiles_dir is not None else None
    rates, rate_what = user_label_rates(data) if hasattr(data, "interactions") else (None, "train label rate")
    extra_ids, extra_dense, reads = baseline_sources(baselines, n_user_rows, dense=baseline_dense,
                                                     data_fingerprint=data_fp)
    extra_ids.update(kwargs.pop("extra_ids", None) or {})
    extra_dense.update(kwargs.pop("extra_dense", None) or {})
    prof = _profiles_read(Path(profiles_dir) if profiles_dir is not None else None)
    reads = {"+ids": f"{prof}; the profile IDs (feature bank)", "+theta": f"{prof}; the personal soft tokens",
             "+label-rate": rate_what, **reads, **(kwargs.pop("reads", None) or {})}
    meta = {
        "data": str(data_dir),
        "bank": str(bank),
        "profiles": str(profiles_dir) if profiles_dir else None,
        "baselines": [str(b) for b in baselines],
        "data_fingerprint": data_fp,
        "profile_names": names,
        "codebook_hash": bank_ids.meta.get("codebook_hash"),  # serving refuses a bank with other codebooks
        "history_len": history_len,  # serving rebuilds the history field with the same length
    }
    for b in V.as_list(backbones, "backbones"):  # a typo fails before --out is claimed
        get_backbone(b)
    # an unfinished table (a killed run) is continued even when asked to overwrite (`userip run` does): its files
    # stay, so run_ctr_table takes over each finished backbone whose inputs digest the same and refits the rest
    marker = read_marker(out) if Path(out).is_dir() else None
    unfinished = bool(marker) and marker.get("kind") == "ctr" and not marker.get("complete")
    claimed = claim_output_dir(out, "ctr", overwrite=overwrite, clear=not unfinished)  # nothing trained yet
    df = run_ctr_table(train, val, test, ids=bank_ids.ids, id_sizes=bank_ids.sizes, activity=activity, theta=theta,
                       user_label_rate=rates, backbones=backbones, seeds=seeds, variants=variants, settings=settings,
                       out=out, profile_names=names, meta=meta, extra_ids=extra_ids, extra_dense=extra_dense,
                       reads=reads, **kwargs)
    claimed.complete()
    return df
