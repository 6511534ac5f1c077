"""Export a run's CTR rows with the profile IDs as a FuxiCTR dataset (CSV) plus its configs.

FuxiCTR (https://github.com/reczoo/FuxiCTR) reads a ``dataset_config.yaml`` (one entry per dataset id: CSV paths,
``feature_cols``, ``label_col``) and a ``model_config.yaml`` (one entry per experiment id: model name, dataset id,
hyper-parameters). The export writes:

- ``train.csv``, ``valid.csv``, ``test.csv``: exactly the rows of our CTR stage (`userip.data.ctr_examples`
  on the run's DATA dir: same split, same order), with the dataset's own user/item ids, ``label``, the fields our
  backbones read (side features as their bucket/value names, ``genres`` and ``history`` as ``^``-joined lists)
  and one categorical column ``profile_<name>`` per profile holding the bank's ID (0 = a user the bank lacks);
- ``dataset_config.yaml`` with two dataset ids over the same CSVs: ``userip_ids_<hash>`` (every field) and
  ``userip_base_<hash>`` (the profile fields inactive), so every model runs with and without the IDs;
- ``model_config.yaml`` with ``<Model>_ids`` and ``<Model>_base`` for each of `FUXICTR_MODELS`, with the
  hyper-parameters of our own CTR backbones (and the run's lr / batch size / epochs);
- ``export.json``: what was exported (run, bank, row counts, profile names, dataset and experiment ids).

The dataset ids carry a hash of the CSVs: FuxiCTR skips rebuilding a dataset id whose ``feature_map.json``
exists, so a re-export with other rows must get a new id rather than silently train on the old parquet.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.errors import UseripError
from userip.io import output_dir, read_json, read_yaml, write_json, write_yaml

KIND = "fuxictr"  # the export's kind of output directory (userip.io.OUTPUT_FILES: what a re-export may replace)
SPLIT_FILES = {"train": "train.csv", "val": "valid.csv", "test": "test.csv"}  # FuxiCTR calls val "valid"

SEP = "^"  # FuxiCTR's default sequence splitter
LABEL = "label"

# Hyper-parameters of userip's own backbones (userip.ctr.models: embedding 8, MLP 16-16, dropout 0.2, 3 cross
# layers), under FuxiCTR's model_zoo parameter names, so a FuxiCTR run is comparable to our CTR table.
FUXICTR_MODELS: dict[str, dict[str, Any]] = {
    "DeepFM": {"hidden_units": [16, 16], "hidden_activations": "relu", "net_dropout": 0.2, "batch_norm": False},
    "DCN": {"dnn_hidden_units": [16, 16], "dnn_activations": "relu", "num_cross_layers": 3, "net_dropout": 0.2,
            "batch_norm": False},
}


def export_fuxictr(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    bank: str | Path | None = None,
    history_len: int | None = None,
    models: Sequence[str] = tuple(FUXICTR_MODELS),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the run's train/valid/test CTR rows with one column per profile ID, and FuxiCTR configs, to
    ``out_dir``; returns what ``export.json`` records.

    ``run_dir``: a `userip run` directory (reads ``RUN/data`` and, unless ``bank`` is given, ``RUN/bank.sqlite``).
    ``bank``: another feature bank (path or URL) built on the same data, e.g. after `userip profile infer`.
    ``history_len``: length of the ``history`` field; default the run's CTR stage's (``RUN/ctr/results.json``,
    else the run config's ``ctr.history_len``, else `userip.ctr.train_ctr`'s default). ``models``: names from
    `FUXICTR_MODELS`; each gets a ``<name>_ids`` and a ``<name>_base`` experiment.

    ``out_dir`` must be new, empty or an earlier export (replaced only with ``overwrite=True``; files userip did
    not write are never touched). Every file is written to a temp folder and moved in once all are written.
    """
    from userip.ctr.train import read_bank_ids
    from userip.data import ctr_examples, load_prepared

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UseripError(f"run directory {run_dir}: not found (write one with `userip run --out {run_dir}`)")
    data_dir = run_dir / "data"
    if not data_dir.is_dir():
        raise UseripError(f"{data_dir}: not found; {run_dir} is not a userip run directory (no data/ stage)")
    unknown = [m for m in models if m not in FUXICTR_MODELS]
    if unknown or not models:
        raise UseripError(f"unknown FuxiCTR models {unknown}; known: {', '.join(FUXICTR_MODELS)}")
    if bank is None:
        bank = run_dir / "bank.sqlite"
        if not bank.is_file():
            raise UseripError(f"{bank}: not found; the run has no feature bank yet (finish `userip run`) or pass "
                              "--bank")
    run_cfg = _run_config(run_dir)
    hl = _history_len(run_dir, run_cfg) if history_len is None else history_len
    if not isinstance(hl, int) or isinstance(hl, bool) or hl < 0:
        raise UseripError(f"history_len must be an integer >= 0, got {hl!r}")

    data = load_prepared(data_dir)
    # the bank the CTR stage reads, read the same way: refused when built on other data, row = user_idx
    bank_ids = read_bank_ids(bank, data)
    ids, names = bank_ids.ids, bank_ids.names
    profile_cols = [f"profile_{n}" for n in names]

    frames = {s: _frame(data, ctr_examples(data, s, history_len=hl), ids, profile_cols) for s in SPLIT_FILES}
    train = frames["train"]
    side = [c for c in train.columns if c not in ("user_id", "item_id", "genres", "history", "timestamp", LABEL,
                                                  *profile_cols)]
    out_dir = Path(out_dir)
    final = out_dir.resolve()  # FuxiCTR resolves relative paths against its own cwd (model_zoo/<Model>)
    with output_dir(out_dir, KIND, overwrite=overwrite) as tmp:
        digest = hashlib.sha256()
        for s, fname in SPLIT_FILES.items():
            frames[s].to_csv(tmp / fname, index=False)
            digest.update((tmp / fname).read_bytes())
        key = digest.hexdigest()[:10]
        datasets = {"ids": f"userip_ids_{key}", "base": f"userip_base_{key}"}
        cols = _feature_cols(side, list(frames.values()), hl, profile_cols)
        dataset_cfg = {
            ds: {
                "data_root": str(final / "fuxictr_data") + "/",
                "data_format": "csv",
                **{k: str(final / SPLIT_FILES[s]) for k, s in (("train_data", "train"), ("valid_data", "val"),
                                                              ("test_data", "test"))},
                "min_categr_count": 1,
                "feature_cols": cols(with_ids=(tag == "ids")),
                "label_col": {"name": LABEL, "dtype": "float"},
            }
            for tag, ds in datasets.items()
        }
        write_yaml(tmp / "dataset_config.yaml", dataset_cfg)
        model_cfg = _model_config(models, datasets, run_cfg.get("ctr") or {}, int(run_cfg.get("seed") or 0), final)
        write_yaml(tmp / "model_config.yaml", model_cfg)
        info = {
            "run": str(run_dir.resolve()),
            "bank": _without_password(str(bank)),
            "data_fingerprint": data.fingerprint,
            "codebook_hash": bank_ids.meta.get("codebook_hash"),
            "profiles": [{"name": n, "column": c, "size": size}
                         for n, c, size in zip(names, profile_cols, bank_ids.sizes, strict=True)],
            "history_len": hl,
            "rows": {SPLIT_FILES[s]: len(f) for s, f in frames.items()},
            "positives": {SPLIT_FILES[s]: int(f[LABEL].sum()) for s, f in frames.items()},
            "dataset_ids": datasets,
            "experiment_ids": [e for e in model_cfg if e != "Base"],
            "side_fields": side,
        }
        write_json(tmp / "export.json", info)
    return info


# ------------------------------------------------------------------ rows
def _frame(data, ex, ids: np.ndarray, profile_cols: list[str]) -> pd.DataFrame:
    """One split's CTRExamples as a table of external ids and value names (what FuxiCTR tokenises)."""
    item_ids = np.asarray(["", *data.item_ids(np.arange(1, data.n_items + 1))], dtype=object)  # code -> id
    genre_names = np.asarray(["", *data.genre_vocab], dtype=object)
    for what, values in (("item id", item_ids), ("genre", genre_names)):
        bad = [v for v in values if SEP in str(v)]
        if bad:
            raise UseripError(f"{what} {bad[0]!r} contains '{SEP}', FuxiCTR's sequence separator; rename it")
    cols: dict[str, Any] = {
        "user_id": data.user_ids(ex.user) if len(ex) else [],
        "item_id": item_ids[ex.item],
    }
    for f, codes in ex.side.items():
        if f in ("user_id", "item_id", "genres", "history", "timestamp", LABEL) or f.startswith("profile_"):
            raise UseripError(f"side feature '{f}' clashes with a column of the FuxiCTR export; rename the users "
                              "column")
        names = np.asarray(["", *ex.side_values.get(f, [])], dtype=object)  # code 0 = unknown -> empty
        cols[f] = names[codes]
    if ex.genres.shape[1] and len(data.genre_vocab):
        cols["genres"] = _join(genre_names[ex.genres])
    if ex.history.shape[1]:
        cols["history"] = _join(item_ids[ex.history])  # most recent last, as our backbones read it
    for j, c in enumerate(profile_cols):
        cols[c] = ids[ex.user, j]
    cols["timestamp"] = ex.timestamp  # not a feature: lets a reader check the time order of the split
    cols[LABEL] = ex.label.astype(np.int64)
    return pd.DataFrame(cols)


def _join(names: np.ndarray) -> list[str]:
    return [SEP.join(v for v in row if v) for row in names]  # "" is padding (code 0)


# ------------------------------------------------------------------ configs
def _feature_cols(side: list[str], frames: list[pd.DataFrame], history_len: int, profile_cols: list[str]):
    """``cols(with_ids)``: FuxiCTR ``feature_cols``; the profile fields are inactive (unread) without ids."""
    train = frames[0]

    def cols(with_ids: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"name": ["user_id", "item_id", *side], "active": True, "dtype": "str", "type": "categorical"}
        ]
        if "genres" in train:
            # every split's longest genre list: FuxiCTR truncates a sequence beyond max_len
            g = max([int(f["genres"].str.count(f"\\{SEP}").max()) + 1 for f in frames if len(f)] + [1])
            out.append({"name": "genres", "active": True, "dtype": "str", "type": "sequence", "splitter": SEP,
                        "max_len": g})
        if "history" in train:
            # Its own table, not `share_embedding: item_id` (our backbones share it): FuxiCTR 2.3.10's LR layer
            # (DeepFM, FM, ...) skips the init of a shared field's 1-dim table, leaving N(0, 1) weights summed
            # over up to max_len items, which swamp the logit (measured: LR logits of -8.6 at init).
            out.append({"name": "history", "active": True, "dtype": "str", "type": "sequence", "splitter": SEP,
                        "max_len": history_len})
        if profile_cols:
            out.append({"name": list(profile_cols), "active": with_ids, "dtype": "str", "type": "categorical"})
        return out

    return cols


def _model_config(models: Sequence[str], datasets: dict[str, str], ctr: dict[str, Any], seed: int,
                  final: Path) -> dict[str, Any]:
    from userip.ctr.models import EMBEDDING_DIM
    from userip.ctr.trainer import TRAIN

    common = {
        "loss": "binary_crossentropy",
        "metrics": ["logloss", "AUC"],
        "task": "binary_classification",
        "optimizer": "adam",
        "learning_rate": float(ctr.get("lr", TRAIN.lr)),
        "embedding_regularizer": 0,
        "net_regularizer": 0,
        "batch_size": int(ctr.get("batch_size", TRAIN.batch_size)),
        "embedding_dim": int(ctr.get("embedding_dim", EMBEDDING_DIM)),
        "epochs": int(ctr.get("max_epochs", TRAIN.max_epochs)),
        "shuffle": True,
        "seed": seed,  # the run's seed
        "monitor": "AUC",
        "monitor_mode": "max",
    }
    cfg: dict[str, Any] = {
        "Base": {"model_root": str(final / "checkpoints") + "/", "num_workers": 1, "verbose": 1,
                 "early_stop_patience": int(ctr.get("patience", TRAIN.patience)), "pickle_feature_encoder": True,
                 "save_best_only": True, "eval_steps": None, "debug_mode": False, "group_id": None,
                 "use_features": None, "feature_specs": None, "feature_config": None},
    }
    for m in models:
        for tag in ("base", "ids"):
            # deep copies: shared lists would come out as YAML anchors
            cfg[f"{m}_{tag}"] = copy.deepcopy({"model": m, "dataset_id": datasets[tag], **common, **FUXICTR_MODELS[m]})
    return cfg


def _run_config(run_dir: Path) -> dict[str, Any]:
    f = run_dir / "config.yaml"
    cfg = read_yaml(f) if f.is_file() else None
    return cfg if isinstance(cfg, dict) else {}


def _history_len(run_dir: Path, run_cfg: dict[str, Any]) -> int:
    """The history length the run's CTR stage used (its results record it), else what it would use."""
    res = run_dir / "ctr" / "results.json"
    if res.is_file():
        hl = ((read_json(res) or {}).get("meta") or {}).get("history_len")
        if hl is not None:
            return int(hl)
    ctr = run_cfg.get("ctr") or {}
    if "history_len" in ctr:
        return ctr["history_len"]
    from userip.ctr import train_ctr

    return int(inspect.signature(train_ctr).parameters["history_len"].default)


def _without_password(location: str) -> str:
    """A bank URL as export.json records it: a redis://user:secret@host URL loses its secret."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(location)
    if parts.password is None:
        return location
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
