"""The CTR table: does a profile-ID field lift a CTR model, honestly?

One run = (backbone, variant, setting, seed) trained on the same split. A variant adds user-feature sources to
``base`` (see :mod:`userip.ctr.variants` for the names and what each is compared with):

- ``+ids``: one categorical field per profile (the bank IDs); ``+theta``: the personal soft tokens (dense);
- baselines given as ``extra_ids`` / ``extra_dense`` (``+hist-ids``, ``+text-dense``, ...);
- every learned source has a permuted twin (``+ids-permuted``, ``+theta-permuted``, ...): its rows permuted
  jointly across users by a seeded permutation that never sees labels (same distribution and capacity, no
  link to behaviour): a vector that merely identifies a user lifts as much as the source would;
- controls: ``+activity`` (quantile buckets of the train interaction count) and ``+label-rate`` (quantile
  buckets of the user's train mean rating, or train label rate for a 0/1 log), each with as many buckets as
  the ID tuple space (prod of codebook sizes), capped by the number of distinct values;
- ``+ids+label-rate``: both fields (does the profile add anything to how the user rates?).

Settings ``with_user_id`` / ``no_user_id`` keep or drop the user-id field. Test metrics are reported for
``all`` users and ``cold`` users (bottom quartile by train interactions); every fit's test predictions are
kept, and the paired lifts come from a bootstrap over test users and seeds (:mod:`userip.ctr.table`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from userip.ctr import variants as V
from userip.ctr.inputs import read_splits
from userip.ctr.models import EMBEDDING_DIM, build_model, get_backbone, save_model
from userip.ctr.results import write_results
from userip.ctr.sources import PERMUTATION_SEED_OFFSET, FeatureInputs, build_sources, cold_users
from userip.ctr.table import BOOTSTRAP, SETTINGS_ORDER, SLICES_ORDER, TestPredictions, lift_frame
from userip.ctr.trainer import TRAIN, TrainSettings, fit, metrics, predict
from userip.errors import UseripError

log = logging.getLogger(__name__)

SETTINGS = tuple(SETTINGS_ORDER)  # with_user_id, no_user_id
SLICES = tuple(SLICES_ORDER)  # all, cold
BOOTSTRAP_SEED_OFFSET = 2_000_003  # the bootstrap replicates of a table whose first seed is s use s + this


def run_ctr_table(
    train,
    val,
    test,
    *,
    ids: np.ndarray,
    id_sizes: Sequence[int],
    activity: np.ndarray,
    theta: np.ndarray | None = None,
    user_label_rate: np.ndarray | None = None,
    backbones: Sequence[str] | str = ("dcn",),
    seeds: int | Sequence[int] = 1,
    variants: Sequence[str] | str | None = None,
    settings: Sequence[str] | str = SETTINGS,
    out: str | Path | None = None,
    profile_names: Sequence[str] | None = None,
    embedding_dim: int = EMBEDDING_DIM,
    model_hparams: dict | None = None,
    backbone_hparams: dict[str, dict] | None = None,
    lr: float = TRAIN.lr,
    weight_decay: float = TRAIN.weight_decay,
    batch_size: int = TRAIN.batch_size,
    max_epochs: int = TRAIN.max_epochs,
    patience: int = TRAIN.patience,
    progress: bool = True,
    meta: dict | None = None,
    extra_ids: dict[str, tuple[np.ndarray, Sequence[int]]] | None = None,
    extra_dense: dict[str, np.ndarray] | None = None,
    reads: Mapping[str, str] | None = None,
    competitor: str | None = None,
    bootstrap: int = BOOTSTRAP,
) -> pd.DataFrame:
    """Train every (backbone, setting, variant, seed) and return one row per run and test slice.

    ``train``/``val``/``test`` are ``CTRExamples`` (or dicts with the same fields). ``ids`` is
    ``[n_users+1, m]`` (row = user_idx, row 0 = unknown) with column ``j`` in ``0..id_sizes[j]``;
    ``activity`` is ``[n_users+1]`` train interaction counts; ``theta`` (optional) is ``[n_users+1, ...]``
    personal soft tokens; ``user_label_rate`` (optional) ``[n_users+1]`` the user's train mean rating (NaN
    without train rows; default: their train label rate from ``train``). ``extra_ids`` / ``extra_dense`` add
    competing sources (the baselines): ``{"+hist-ids": (ids [n_users+1, j], sizes)}``,
    ``{"+text-dense": array [n_users+1, d]}``; ``reads`` says what each read (``{"+hist-ids": "..."}``).

    ``variants``: ``"default"`` (the headline: base, +ids, +ids-permuted, +activity, +label-rate,
    +ids+label-rate and the ``competitor`` with its twin), ``"all"`` (every source with its twin) or a list.
    With ``out``, writes ``results.json`` (runs, fits, paired lifts with ``bootstrap`` replicates), ``results.md``,
    ``predictions.npz`` (every fit's test predictions) and ``models/<backbone>.safetensors`` (+ ``.json``) of
    the ``+ids`` first-seed model (with_user_id where run).
    """
    # ---- what to run
    backbones = V.as_list(backbones, "backbones")
    for b in backbones:
        get_backbone(b)
    seeds = list(range(int(seeds))) if isinstance(seeds, int | np.integer) else [int(s) for s in seeds]
    if not seeds:
        raise UseripError("no seeds given")
    settings = list(SETTINGS) if settings == "both" else V.as_list(settings, "settings", SETTINGS)
    if int(bootstrap) < 10:
        raise UseripError(f"bootstrap must be >= 10 replicates, got {bootstrap}")
    train_settings = TrainSettings(lr=lr, weight_decay=weight_decay, batch_size=batch_size, max_epochs=max_epochs,
                                   patience=patience)
    model_hp = {b: {**(model_hparams or {}), **(backbone_hparams or {}).get(b, {})} for b in backbones}

    # ---- the examples, the user features a variant can add, the test slices
    splits, base = read_splits(train, val, test)
    n_user_rows = base["user"].vocab
    sources, facts = build_sources(n_user_rows, splits[0], ids=ids, id_sizes=id_sizes, activity=activity,
                                   profile_names=profile_names, theta=theta, user_label_rate=user_label_rate,
                                   extra_ids=extra_ids, extra_dense=extra_dense, reads=reads)
    variants = V.resolve(variants, sources, competitor)
    features = FeatureInputs(base, splits, sources)
    y_train, y_val, y_test = torch.from_numpy(splits[0].label), splits[1].label, splits[2].label
    cold_mask, cold_threshold = cold_users(activity)
    test_slices = {"all": np.ones(len(y_test), dtype=bool), "cold": cold_mask[splits[2].user]}
    for backbone in backbones:  # fail before any training: unknown hyper-parameters, DIN without history
        for variant in variants:
            build_model(backbone, features(variant, settings[0], seeds[0])[0], embedding_dim=embedding_dim,
                        **model_hp[backbone])
    # the model kept in OUT/models: the +ids first-seed fit (with_user_id where run)
    export = next(((v, s) for v, s in (("+ids", "with_user_id"), ("+ids", "no_user_id"))
                   if v in variants and s in settings), (variants[0], settings[0])) + (seeds[0],)
    out = Path(out) if out is not None else None
    info = {
        "n_rows": {s.name: len(s.label) for s in splits},
        "n_users": n_user_rows - 1,
        **facts,  # id_sizes, profile_fields, the controls' buckets, what +label-rate reads
        "cold_threshold": cold_threshold,
        "cold_test_rows": int(test_slices["cold"].sum()),
        "permutation_seed": f"seed + {PERMUTATION_SEED_OFFSET}",
        "bootstrap": {"replicates": int(bootstrap), "seed": seeds[0] + BOOTSTRAP_SEED_OFFSET,
                      "resamples": "test users and seeds, with replacement"},
        "variants": variants,
        "reads": {"+" + n: s.reads for n, s in sources.items()
                  if s.reads and any(n in map(V.source_of, V.parts(v)) for v in variants)},
        "train": {**dataclasses.asdict(train_settings), "embedding_dim": embedding_dim},
        **(meta or {}),
    }

    # ---- every backbone x setting x variant x seed, on the same split
    preds = TestPredictions(y_test, splits[2].user, test_slices)
    rows: list[dict] = []
    fits: list[dict] = []
    common = _inputs_digest(splits, sources, test_slices, variants=variants, settings=settings, seeds=seeds,
                            train=dataclasses.asdict(train_settings), embedding_dim=embedding_dim)
    info["backbone_keys"] = {b: _digest(common, model_hp[b]) for b in backbones}
    done = _finished_backbones(out, info["backbone_keys"], preds, rows, fits, settings, variants, seeds)
    bar = tqdm(total=len(backbones) * len(settings) * len(variants) * len(seeds), desc="ctr runs",
               disable=not progress, unit="run")
    for backbone in backbones:
        if backbone in done:  # a killed table's finished backbone: same inputs, so the same fits (kept)
            bar.update(len(settings) * len(variants) * len(seeds))
            continue
        for setting, variant, seed in itertools.product(settings, variants, seeds):
            t0 = time.perf_counter()
            spec, (tr, va, te) = features(variant, setting, seed)
            torch.manual_seed(seed)
            model = build_model(backbone, spec, embedding_dim=embedding_dim, **model_hp[backbone])
            res = fit(model, tr, y_train, va, y_val, seed=seed, settings=train_settings, progress=progress,
                      desc=f"{backbone} {variant} {setting} s{seed}")
            p = predict(model, te)
            preds.add(backbone, setting, variant, seed, p)
            wall = time.perf_counter() - t0
            run = {"backbone": backbone, "variant": variant, "setting": setting, "seed": seed}
            for sl, mask in test_slices.items():
                m = metrics(y_test[mask], p[mask])
                rows.append({**run, "slice": sl, "auc": m["auc"], "logloss": m["logloss"], "n_rows": int(mask.sum()),
                             "epochs": res.epochs, "best_val_auc": res.best_val_auc, "wall_s": wall})
            fits.append({**run, "epochs": res.epochs, "best_epoch": res.best_epoch,
                         "best_val_auc": res.best_val_auc, "wall_s": wall, "history": res.history})
            if out is not None and (variant, setting, seed) == export:
                save_model(out / "models" / f"{backbone}.safetensors", model,
                           extra={"variant": variant, "setting": setting, "seed": seed, "id_sizes": facts["id_sizes"],
                                  "profile_fields": facts["profile_fields"], "best_val_auc": res.best_val_auc})
            bar.update(1)
            bar.set_postfix(last=f"{backbone} {variant} {setting} auc={rows[-2]['auc']:.4f}")
        if out is not None:  # the runs and test predictions so far, after every backbone: a killed table keeps
            preds.save(out / "predictions.npz")  # what its paired lifts need (lift_frame(TestPredictions.load(...)))
            write_results(out, rows, fits, info)
    bar.close()
    if done:  # taken-over backbones first: put every run back in the order an uninterrupted table writes
        order = {b: i for i, b in enumerate(backbones)}
        rows.sort(key=lambda r: order[r["backbone"]])
        fits.sort(key=lambda f: order[f["backbone"]])
        preds.preds = dict(sorted(preds.preds.items(), key=lambda kv: order[kv[0][0]]))

    # ---- the paired lifts: bootstrap over test users and seeds
    df = pd.DataFrame(rows)
    t0 = time.perf_counter()
    lifts = lift_frame(preds, n_boot=int(bootstrap), seed=seeds[0] + BOOTSTRAP_SEED_OFFSET)
    info["bootstrap"]["wall_s"] = round(time.perf_counter() - t0, 2)
    df.attrs["lifts"] = lifts  # the paired comparisons travel with the runs (train_ctr's callers read them)
    if out is not None:
        preds.save(out / "predictions.npz")
        write_results(out, rows, fits, info, final=df, lifts=lifts)
    return df


# ------------------------------------------------------------------ resuming a killed table
def _digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()


def _inputs_digest(splits, sources, test_slices, **plain) -> str:
    """Everything a backbone's fits depend on besides its hyper-parameters: the examples, every user source,
    the test slices and the plan (variants, settings, seeds, training settings)."""
    arrays: list = []
    for sp in splits:
        arrays += [sp.name, sp.user, sp.label] + [x for k in sorted(sp.cols) for x in (k, sp.cols[k])]
    for name in sorted(sources):
        arrays += [name, sources[name].table]
    for name in sorted(test_slices):
        arrays += [name, test_slices[name]]
    return _digest(plain, *arrays)


def _finished_backbones(out: Path | None, keys: dict[str, str], preds: TestPredictions, rows: list[dict],
                        fits: list[dict], settings, variants, seeds) -> set[str]:
    """Backbones an unfinished table in ``out`` already ran on the same inputs (their key in its results.json
    matches and predictions.npz holds every fit): their runs, fits and test predictions are taken over."""
    if out is None or not (out / "results.json").is_file() or not (out / "predictions.npz").is_file():
        return set()
    from userip.io import read_json

    try:
        old = read_json(out / "results.json")
        saved = TestPredictions.load(out / "predictions.npz")
    except Exception as e:  # an unreadable partial table is rerun, never trusted
        log.warning("not resuming the CTR table in %s: %s", out, e)
        return set()
    old_keys = (old.get("meta") or {}).get("backbone_keys") or {}
    done = set()
    for b, key in keys.items():
        want = [(b, st, v, sd) for st, v, sd in itertools.product(settings, variants, seeds)]
        if old_keys.get(b) != key or not all(k in saved.preds for k in want):
            continue
        b_rows = [r for r in old.get("runs", []) if r.get("backbone") == b]
        b_fits = [f for f in old.get("fits", []) if f.get("backbone") == b]
        if len(b_fits) != len(want) or len(b_rows) != len(want) * len(preds.slices):
            continue
        for r in b_rows:  # JSON has no NaN: json_safe wrote an undefined metric as null
            r.update({k: math.nan for k in ("auc", "logloss") if r.get(k) is None})
        rows += b_rows
        fits += b_fits
        for k in want:
            preds.preds[k] = saved.preds[k]
        done.add(b)
        log.info("CTR table: %s taken over from the unfinished table in %s", b, out)
    return done
