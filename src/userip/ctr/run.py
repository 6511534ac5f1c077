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

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from userip.ctr import variants as V
from userip.ctr.models import _get as _get_backbone
from userip.ctr.models import build_model
from userip.ctr.spec import FeatureSpec, Field
from userip.ctr.table import BOOTSTRAP, TestPredictions, lift_frame, results_markdown, summary_sentences, winners
from userip.ctr.trainer import RowLookup, fit, metrics, predict
from userip.data.prepared import fingerprint_mismatch
from userip.errors import UseripError
from userip.io import check_format

SETTINGS = ("with_user_id", "no_user_id")
SLICES = ("all", "cold")
PERMUTATION_SEED_OFFSET = 1_000_003  # the permuted twins of seed s use the permutation of seed s + this
BOOTSTRAP_SEED_OFFSET = 2_000_003  # the bootstrap replicates of a table whose first seed is s use s + this
COLD_QUANTILE = 0.25
VARIANT_LISTS = ("default", "all")  # named lists; any "+part" combination of built sources also works


# ------------------------------------------------------------------ inputs
@dataclass
class _Split:
    name: str
    user: np.ndarray  # int64 [N]
    label: np.ndarray  # float32 [N]
    cols: dict[str, np.ndarray]  # base field name -> codes ([N] or [N, L])


def _attr(ex, name: str):
    if isinstance(ex, dict):
        return ex.get(name)
    return getattr(ex, name, None)


def _read_examples(ex, split: str) -> tuple[_Split, dict[str, int]]:
    """Validate a ``CTRExamples``-like object (attributes or a dict) and pull its arrays."""
    what = f"{split} CTR examples"
    if ex is None:
        raise UseripError(f"{what}: none given")
    arrays = {}
    for name in ("user", "item", "label"):
        v = _attr(ex, name)
        if v is None:
            raise UseripError(f"{what}: missing field '{name}' (expected userip.data.ctr_examples output)")
        arrays[name] = np.asarray(v)
    n = len(arrays["label"])
    if n == 0:
        raise UseripError(f"{what}: no rows")
    vocab = dict(_attr(ex, "vocab") or {})
    if not vocab:
        raise UseripError(f"{what}: missing field 'vocab' (embedding table sizes for user, item, genre, side)")
    cols: dict[str, np.ndarray] = {}
    for name in ("user", "item"):
        cols[name] = arrays[name].astype(np.int64).reshape(-1)
    for name, _key, ndim in (("genres", "genre", 2), ("history", "item", 2)):
        v = _attr(ex, name)
        if v is None:
            continue
        v = np.asarray(v)
        if v.ndim != ndim:
            raise UseripError(f"{what}: field '{name}' must be 2-D [N, L], got shape {v.shape}")
        cols[name] = v.astype(np.int64)
    for k, v in dict(_attr(ex, "side") or {}).items():
        cols[f"side:{k}"] = np.asarray(v).astype(np.int64).reshape(-1)
    for k, v in cols.items():
        if len(v) != n:
            raise UseripError(f"{what}: field '{k}' has {len(v)} rows, label has {n}")
        if v.size and v.min() < 0:
            raise UseripError(f"{what}: field '{k}' has negative codes")
    label = arrays["label"].astype(np.float32).reshape(-1)
    if not np.isin(label, (0.0, 1.0)).all():
        raise UseripError(f"{what}: field 'label' must be 0/1")
    return _Split(split, cols["user"], label, cols), vocab


def _vocab_key(col: str) -> str:
    return {"genres": "genre", "history": "item"}.get(col, col.removeprefix("side:"))


def _base_fields(splits: list[_Split], vocabs: list[dict[str, int]]) -> dict[str, Field]:
    """Fields (by column) with table sizes: the largest declared vocab; a code beyond it is an error."""
    fields: dict[str, Field] = {}
    for col in splits[0].cols:
        if any(col not in s.cols for s in splits):
            raise UseripError(f"field '{col}' is present in {splits[0].name} but not in every split")
        key = _vocab_key(col)
        size = max(int(v.get(key, 0)) for v in vocabs)
        top = max(int(s.cols[col].max()) for s in splits)
        if size == 0:
            raise UseripError(f"CTR examples: vocab has no size for '{key}' (needed by field '{col}')")
        if top >= size:
            raise UseripError(f"CTR examples: field '{col}' has code {top} but vocab['{key}'] = {size}")
        if col == "history":
            fields[col] = Field(col, "sequence", share="item")
        elif col == "genres":
            fields[col] = Field(col, "bag", vocab=size)
        else:
            fields[col] = Field(col, "categorical", vocab=size)
    return fields


# ------------------------------------------------------------------ profile-side features
def permute_ids(ids: np.ndarray, seed: int) -> np.ndarray:
    """Rows 1..n of ``ids`` permuted jointly (whole rows: ID tuples or vectors) by a seeded permutation; row 0
    stays. Takes no labels: the permuted rows keep the exact multiset of rows and lose any link to behaviour.
    """
    ids = np.asarray(ids)
    perm = np.random.default_rng(int(seed)).permutation(len(ids) - 1) + 1
    out = ids.copy()
    out[1:] = ids[perm]
    return out


def quantile_buckets(values: np.ndarray, n_buckets: int) -> tuple[np.ndarray, int]:
    """Quantile buckets ``1..k`` of per-user values, ``k = min(n_buckets, distinct values)``; row 0 and NaN
    (a user with nothing to measure) -> 0, the unknown code."""
    a = np.asarray(values, dtype=np.float64).copy()
    a[0] = np.nan
    known = np.isfinite(a)
    users = a[known]
    k = int(max(1, min(n_buckets, len(np.unique(users))))) if len(users) else 1
    edges = np.quantile(users, np.linspace(0, 1, k + 1)[1:-1]) if k > 1 else np.zeros(0)
    out = np.zeros(len(a), dtype=np.int64)
    out[known] = np.searchsorted(edges, users, side="right") + 1
    return out, k


def activity_buckets(activity: np.ndarray, n_buckets: int) -> tuple[np.ndarray, int]:
    """Quantile buckets ``1..k`` of per-user counts (row 0 -> 0), ``k = min(n_buckets, distinct counts)``."""
    return quantile_buckets(activity, n_buckets)


def label_rate(users: np.ndarray, labels: np.ndarray, n_user_rows: int) -> np.ndarray:
    """Per user_idx, the mean of ``labels`` over their rows (NaN for a user without rows): the train label
    rate, or the train mean rating when ``labels`` are ratings."""
    users = np.asarray(users, dtype=np.int64)
    n = np.bincount(users, minlength=n_user_rows)[:n_user_rows].astype(np.float64)
    s = np.bincount(users, weights=np.asarray(labels, dtype=np.float64), minlength=n_user_rows)[:n_user_rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.where(n > 0, n, 1), np.nan)


def cold_users(activity: np.ndarray, quantile: float = COLD_QUANTILE) -> tuple[np.ndarray, float]:
    """Bool mask over user_idx of users at or below the ``quantile`` of train interaction counts."""
    a = np.asarray(activity, dtype=np.float64)
    threshold = float(np.quantile(a[1:], quantile)) if len(a) > 1 else 0.0
    mask = a <= threshold
    mask[0] = False
    return mask, threshold


def _profile_field_names(m: int, profile_names: Sequence[str] | None) -> list[str]:
    names = list(profile_names) if profile_names else [f"p{j}" for j in range(m)]
    if len(names) != m:
        raise UseripError(f"{len(names)} profile names given for an ids array with {m} columns")
    return [f"profile:{n}" for n in names]


def _scaled_dense(x, what: str, n_user_rows: int) -> np.ndarray:
    """``[n_users+1, ...]`` -> ``[n_users+1, d]`` float32 divided by one global scale (the linear layer sees
    values of order 1; one scale for all dims keeps the vector's geometry)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2 or x.shape[0] != n_user_rows:
        raise UseripError(f"{what} must have shape [n_users+1, ...] with {n_user_rows} rows, got {x.shape}")
    if not np.isfinite(x).all():
        raise UseripError(f"{what} holds NaN or inf values")
    x = x.reshape(n_user_rows, -1)
    scale = float(x[1:].std()) or 1.0
    return np.ascontiguousarray(x / scale)


def _check_ids(ids, sizes, what: str, n_user_rows: int) -> tuple[np.ndarray, list[int]]:
    want = f"[n_users+1, m] = [{n_user_rows}, {len(sizes)}]"
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != len(sizes) or ids.shape[0] != n_user_rows or len(sizes) == 0:
        raise UseripError(f"{what} must have shape {want} (row = user_idx, row 0 unknown), got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise UseripError(f"{what} must be integers, got dtype {ids.dtype}")
    sizes = [int(s) for s in sizes]
    for j, s in enumerate(sizes):
        col = ids[:, j]
        if s < 1 or col.min() < 0 or col.max() > s:
            raise UseripError(f"{what} column {j}: values must lie in 0..{s} (sizes[{j}]), "
                              f"got {col.min()}..{col.max()}")
    return np.ascontiguousarray(ids, dtype=np.int64), sizes


@dataclass
class Source:
    """A user feature the table can add: an ID tuple per user (``sizes`` codes per column) or a vector."""

    name: str  # the variant part, e.g. "ids", "hist-dense", "label-rate"
    table: np.ndarray  # [n_users+1, m] int64 or [n_users+1, d] float32 (row = user_idx)
    fields: list[Field]
    reads: str = ""  # what it was computed from, for the report

    @property
    def dense(self) -> bool:
        return self.fields[0].kind == "dense"

    def tensor(self, seed: int | None) -> torch.Tensor:
        """The table, or with ``seed`` its permuted twin (rows permuted jointly across users)."""
        t = self.table if seed is None else permute_ids(self.table, seed)
        return torch.from_numpy(np.ascontiguousarray(t))


def _ids_source(name: str, ids, sizes, field_names: list[str], reads: str, n_user_rows: int) -> Source:
    table, sizes = _check_ids(ids, sizes, f"{name} ids" if name != "ids" else "ids", n_user_rows)
    fields = [Field(f, "categorical", vocab=s + 1) for f, s in zip(field_names, sizes, strict=True)]
    return Source(name, table, fields, reads)


def _dense_source(name: str, x, reads: str, n_user_rows: int) -> Source:
    table = _scaled_dense(x, name, n_user_rows)
    return Source(name, table, [Field(f"dense:{name}", "dense", dim=table.shape[1])], reads)


# ------------------------------------------------------------------ the table
def _as_list(x, what: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [s.strip() for s in x.split(",")] if isinstance(x, str) else list(x)
    items = [s for s in items if s]
    if not items:
        raise UseripError(f"no {what} given")
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise UseripError(f"unknown {what} {bad}; known: {', '.join(allowed)}")
    return list(dict.fromkeys(items))


_EXTRA = re.compile(r"\+[a-z0-9][a-z0-9_-]*")


def _resolve_variants(variants, sources: dict[str, Source], competitor: str | None) -> list[str]:
    """``default`` / ``all`` / a list (comma string) of variants, each checked against the built sources."""
    learned = ["+" + n for n in sources if n not in V.CONTROL_PARTS]
    lists = V.variant_lists(learned, competitor)
    chosen = variants if variants is not None else "default"
    if isinstance(chosen, str) and chosen.strip() in lists:
        chosen = lists[chosen.strip()]
    chosen = _as_list(chosen, "variants")
    out = []
    for v in chosen:
        if v in lists:
            out += lists[v]
            continue
        try:
            ps = V.parts(v)
        except UseripError as e:
            raise UseripError(f"unknown variants ['{v}']: {e}") from None
        for p in ps:
            base = p[: -len(V.PERMUTED)] if V.is_permuted(p) else p
            if base not in sources or (V.is_permuted(p) and base in V.CONTROL_PARTS):
                known = ", ".join(["default", "all", *lists["all"]])
                hint = (f"variant '{v}' needs theta (the personal soft tokens, e.g. from --profiles)"
                        if base == "theta" else f"unknown variants ['{v}']")
                raise UseripError(f"{hint}; known: {known}")
        out.append(v)
    return list(dict.fromkeys(out))


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
    embedding_dim: int = 8,
    model_hparams: dict | None = None,
    backbone_hparams: dict[str, dict] | None = None,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    batch_size: int = 4096,
    max_epochs: int = 20,
    patience: int = 2,
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
    backbones = _as_list(backbones, "backbones")
    for b in backbones:
        _get_backbone(b)
    seeds = list(range(int(seeds))) if isinstance(seeds, int | np.integer) else [int(s) for s in seeds]
    if not seeds:
        raise UseripError("no seeds given")
    settings = _as_list(settings, "settings", SETTINGS)
    if int(bootstrap) < 10:
        raise UseripError(f"bootstrap must be >= 10 replicates, got {bootstrap}")

    parts = [_read_examples(ex, name) for ex, name in ((train, "train"), (val, "val"), (test, "test"))]
    splits = [p[0] for p in parts]
    base = _base_fields(splits, [p[1] for p in parts])
    n_user_rows = base["user"].vocab
    max_user = max(int(s.user.max()) for s in splits)
    if max_user >= n_user_rows:
        raise UseripError(f"examples use user_idx {max_user} but the user vocab has only {n_user_rows} rows")
    ids_arr = np.asarray(ids)
    if ids_arr.ndim != 2 or ids_arr.shape[0] != n_user_rows:
        raise UseripError(f"ids must have shape [n_users+1, m] = [{n_user_rows}, {len(id_sizes)}] "
                          f"(row = user_idx, row 0 unknown), got {ids_arr.shape}")
    pnames = _profile_field_names(ids_arr.shape[1], profile_names)
    activity = np.asarray(activity)
    if activity.shape != (n_user_rows,):
        raise UseripError(f"activity must have shape [n_users+1] = [{n_user_rows}], got {activity.shape}")
    reads = dict(reads or {})
    sources: dict[str, Source] = {}
    sources["ids"] = _ids_source("ids", ids_arr, id_sizes, pnames,
                                 reads.get("+ids", "the profile IDs (feature bank)"), n_user_rows)
    id_sizes = [f.vocab - 1 for f in sources["ids"].fields]
    tuple_space = int(np.prod([float(s) for s in id_sizes]))
    act_bucket, n_act = activity_buckets(activity, tuple_space)
    sources["activity"] = Source("activity", act_bucket[:, None], [Field("activity", "categorical", vocab=n_act + 1)],
                                 f"train interaction count, {n_act} quantile buckets")
    if user_label_rate is None:
        rate, rate_what = label_rate(splits[0].user, splits[0].label, n_user_rows), "train label rate"
    else:
        rate, rate_what = np.asarray(user_label_rate, dtype=np.float64), reads.get("+label-rate", "train mean rating")
        if rate.shape != (n_user_rows,):
            raise UseripError(f"user_label_rate must have shape [n_users+1] = [{n_user_rows}], got {rate.shape}")
    rate_bucket, n_rate = quantile_buckets(rate, tuple_space)
    sources["label-rate"] = Source("label-rate", rate_bucket[:, None],
                                   [Field("label_rate", "categorical", vocab=n_rate + 1)],
                                   f"{rate_what} per user, {n_rate} quantile buckets")
    if theta is not None:
        sources["theta"] = _dense_source("theta", theta, reads.get("+theta", "the personal soft tokens"), n_user_rows)
    for name, spec in {**(extra_ids or {}), **(extra_dense or {})}.items():
        if not _EXTRA.fullmatch(str(name)) or V.is_permuted(name) or name[1:] in sources:
            raise UseripError(f"extra source '{name}': expected a new '+name' of [a-z0-9_-] not ending in "
                              f"'{V.PERMUTED}' (taken: {', '.join('+' + n for n in sources)})")
        what = reads.get(name, "")
        if name in (extra_ids or {}):
            table, sizes = spec
            sources[name[1:]] = _ids_source(name[1:], table, sizes,
                                            [f"extra:{name[1:]}:{j}" for j in range(len(sizes))], what, n_user_rows)
        else:
            sources[name[1:]] = _dense_source(name[1:], spec, what, n_user_rows)
    variants = _resolve_variants(variants, sources, competitor)
    cold_mask, cold_threshold = cold_users(activity)

    tensors = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.cols.items()} for s in splits]
    users_t = [t["user"] for t in tensors]
    train_y = torch.from_numpy(splits[0].label)
    test_slices = {"all": np.ones(len(splits[2].label), dtype=bool), "cold": cold_mask[splits[2].user]}
    tables: dict[tuple[str, int | None], torch.Tensor] = {}  # (source, permutation seed) -> table, across fits

    def features(variant: str, setting: str, seed: int) -> tuple[FeatureSpec, list[dict]]:
        fields = [f for c, f in base.items() if c != "user" or setting == "with_user_id"]
        inputs = [{f.name: t[f.name] for f in fields} for t in tensors]
        for part in V.parts(variant):
            permuted = V.is_permuted(part)
            src = sources[part[: -len(V.PERMUTED)] if permuted else part]
            key = (src.name, seed + PERMUTATION_SEED_OFFSET if permuted else None)
            if key not in tables:
                tables[key] = src.tensor(key[1])
            table = tables[key]
            fields += src.fields  # a twin has exactly its source's fields: the same model, other rows
            for inp, u in zip(inputs, users_t, strict=True):
                if src.dense:  # a wide vector per user rides along by user index, never as [N, dim]
                    inp[src.fields[0].name] = RowLookup(table, u)
                else:
                    for j, f in enumerate(src.fields):
                        inp[f.name] = table[u, j]
        return FeatureSpec(fields), inputs

    hp_all = dict(model_hparams or {})
    for backbone in backbones:  # fail before any training: unknown hyper-parameters, DIN without history
        for variant in variants:
            build_model(backbone, features(variant, settings[0], seeds[0])[0], embedding_dim=embedding_dim,
                        **{**hp_all, **(backbone_hparams or {}).get(backbone, {})})
    export_key = next(
        ((v, s) for v, s in (("+ids", "with_user_id"), ("+ids", "no_user_id")) if v in variants and s in settings),
        (variants[0], settings[0]),
    )
    out = Path(out) if out is not None else None
    read_by = {"+" + n: s.reads for n, s in sources.items() if s.reads and any(
        n in (p[: -len(V.PERMUTED)] if V.is_permuted(p) else p for p in V.parts(v)) for v in variants)}
    info = {
        "n_rows": {s.name: len(s.label) for s in splits},
        "n_users": n_user_rows - 1,
        "id_sizes": id_sizes,
        "profile_fields": pnames,
        "activity_buckets": n_act,
        "label_rate_buckets": n_rate,
        "label_rate_of": rate_what,
        "cold_threshold": cold_threshold,
        "cold_test_rows": int(test_slices["cold"].sum()),
        "permutation_seed": f"seed + {PERMUTATION_SEED_OFFSET}",
        "bootstrap": {"replicates": int(bootstrap), "seed": seeds[0] + BOOTSTRAP_SEED_OFFSET,
                      "resamples": "test users and seeds, with replacement"},
        "variants": variants,
        "reads": read_by,
        "train": {
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "max_epochs": max_epochs,
            "patience": patience,
            "embedding_dim": embedding_dim,
        },
        **(meta or {}),
    }
    preds = TestPredictions(splits[2].label, splits[2].user, test_slices)
    rows: list[dict] = []
    fits: list[dict] = []
    total = len(backbones) * len(settings) * len(variants) * len(seeds)
    bar = tqdm(total=total, desc="ctr runs", disable=not progress, unit="run")
    for backbone in backbones:
        hp = {**hp_all, **(backbone_hparams or {}).get(backbone, {})}
        for setting in settings:
            for variant in variants:
                for seed in seeds:
                    t0 = time.perf_counter()
                    spec, (tr, va, te) = features(variant, setting, seed)
                    torch.manual_seed(seed)
                    model = build_model(backbone, spec, embedding_dim=embedding_dim, **hp)
                    res = fit(
                        model,
                        tr,
                        train_y,
                        va,
                        splits[1].label,
                        seed=seed,
                        lr=lr,
                        weight_decay=weight_decay,
                        batch_size=batch_size,
                        max_epochs=max_epochs,
                        patience=patience,
                        progress=progress,
                        desc=f"{backbone} {variant} {setting} s{seed}",
                    )
                    p = predict(model, te)
                    preds.add(backbone, setting, variant, seed, p)
                    wall = time.perf_counter() - t0
                    run = {"backbone": backbone, "variant": variant, "setting": setting, "seed": seed}
                    for sl, mask in test_slices.items():
                        m = metrics(splits[2].label[mask], p[mask])
                        rows.append(
                            {
                                **run,
                                "slice": sl,
                                "auc": m["auc"],
                                "logloss": m["logloss"],
                                "n_rows": int(mask.sum()),
                                "epochs": res.epochs,
                                "best_val_auc": res.best_val_auc,
                                "wall_s": wall,
                            }
                        )
                    fits.append(
                        {
                            **run,
                            "epochs": res.epochs,
                            "best_epoch": res.best_epoch,
                            "best_val_auc": res.best_val_auc,
                            "wall_s": wall,
                            "history": res.history,
                        }
                    )
                    if out is not None and (variant, setting) == export_key and seed == seeds[0]:
                        save_model(
                            out / "models" / f"{backbone}.safetensors",
                            model,
                            extra={
                                "variant": variant,
                                "setting": setting,
                                "seed": seed,
                                "id_sizes": id_sizes,
                                "profile_fields": pnames,
                                "best_val_auc": res.best_val_auc,
                            },
                        )
                    bar.update(1)
                    bar.set_postfix(last=f"{backbone} {variant} {setting} auc={rows[-2]['auc']:.4f}")
        if out is not None:
            _write_results(out, rows, fits, info)
    bar.close()
    df = pd.DataFrame(rows)
    t0 = time.perf_counter()
    lifts = lift_frame(preds, n_boot=int(bootstrap), seed=seeds[0] + BOOTSTRAP_SEED_OFFSET)
    info["bootstrap"]["wall_s"] = round(time.perf_counter() - t0, 2)
    df.attrs["lifts"] = lifts  # the paired comparisons travel with the runs (train_ctr's callers read them)
    if out is not None:
        preds.save(out / "predictions.npz")
        _write_results(out, rows, fits, info, final=df, lifts=lifts)
    return df


def _write_results(out: Path, rows, fits, info, final: pd.DataFrame | None = None,
                   lifts: pd.DataFrame | None = None) -> None:
    from userip.io import atomic_path, write_json

    body = {"meta": info, "runs": _json_safe(rows), "fits": _json_safe(fits)}
    if lifts is not None:
        body["lifts"] = _json_safe(lifts.to_dict(orient="records"))
        body["summary"] = summary_sentences(lifts)
        body["winners"] = winners(lifts)
        body["comparisons"] = len(lifts)
    write_json(out / "results.json", body)
    if final is not None:
        notes = [
            f"Cold slice: users with <= {info['cold_threshold']:g} train interactions "
            f"({info['cold_test_rows']} test rows). `+activity` uses {info['activity_buckets']} buckets, "
            f"`+label-rate` {info['label_rate_buckets']} ({info['label_rate_of']})."
        ]
        max_epochs = info["train"]["max_epochs"]
        hit = sum(f["epochs"] >= max_epochs for f in fits)
        if hit:
            notes.append(
                f"{hit} of {len(fits)} runs stopped at max_epochs={max_epochs} without early stopping: "
                "they may be under-trained (raise --max-epochs or --lr)."
            )
        walls = [f["wall_s"] for f in fits]
        notes.append(f"{len(fits)} fits, {np.median(walls):.1f} s median per fit (train, validate, predict).")
        with atomic_path(out / "results.md") as tmp:
            tmp.write_text(results_markdown(final, lifts, notes=notes, reads=info.get("reads"),
                                            n_boot=info["bootstrap"]["replicates"]))


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and math.isnan(obj):
        return None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ------------------------------------------------------------------ model files
def save_model(path: str | Path, model: torch.nn.Module, extra: dict | None = None) -> None:
    """Weights as safetensors plus ``<stem>.json`` with the backbone config and feature spec."""
    from safetensors.torch import save_file

    from userip.io import atomic_path, write_json

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    cfg = dict(model.ctr_config)
    write_json(
        path.with_suffix(".json"),
        {
            "format": 1,
            "backbone": cfg.pop("backbone"),
            "hparams": cfg,
            "spec": model.ctr_spec.to_dict(),
            **_json_safe(extra or {}),
        },
    )


def load_model(path: str | Path) -> torch.nn.Module:
    """Rebuild a model written by :func:`save_model` (path of the .safetensors or the .json), in eval mode."""
    from safetensors.torch import load_file

    from userip.io import read_json

    path = Path(path)
    weights, cfg_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not weights.exists() or not cfg_path.exists():
        raise UseripError(f"model files not found: need {weights} and {cfg_path}")
    cfg = read_json(cfg_path)
    spec = FeatureSpec.from_dict(cfg["spec"])
    model = build_model(cfg["backbone"], spec, **cfg.get("hparams", {}))
    model.load_state_dict(load_file(str(weights)))
    model.ctr_extra = {k: cfg[k] for k in ("variant", "setting", "seed", "id_sizes", "profile_fields") if k in cfg}
    return model.eval()


# ------------------------------------------------------------------ from prepared data + bank
DEFAULT_BACKBONES = ("dcn", "deepfm", "dcnv2", "autoint", "din")


def _bank_id_sizes(bank_meta: dict, names: list[str] | None, ids: np.ndarray) -> list[int]:
    """Codebook sizes from the bank meta (``profiles: [{name, size}]``), else the largest ID seen per column."""
    profiles = bank_meta.get("profiles")
    if isinstance(profiles, list) and profiles and all(isinstance(p, dict) for p in profiles):
        by_name = {p.get("name"): p.get("size", p.get("codebook_size")) for p in profiles}
        sizes = [by_name.get(n) for n in names] if names else list(by_name.values())
        if len(sizes) == ids.shape[1] and all(isinstance(s, int | np.integer) for s in sizes):
            return [int(s) for s in sizes]
    return [max(1, int(c)) for c in ids.max(axis=0)]


def _load_personal(profiles_dir: Path, n_user_rows: int, data_fp: str | None) -> np.ndarray:
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
    ``overwrite=True`` (its results and models are removed first; other files are never touched)."""
    from userip.bank import open_bank
    from userip.data import ctr_examples, load_prepared
    from userip.io import claim_output_dir

    data = load_prepared(data_dir)
    fb = open_bank(bank)
    bank_meta = dict(fb.meta() or {})
    data_fp = getattr(data, "fingerprint", None)
    bank_fp = bank_meta.get("data_fingerprint")
    if bank_fp != data_fp:
        raise UseripError(fingerprint_mismatch(f"bank {bank}", bank_fp, str(data_fp)) + f" ({data_dir})")
    n_user_rows = int(data.n_users) + 1
    users = data.users.sort_values("user_idx")
    got = np.asarray(fb.get([str(u) for u in users["user_id"]]))
    if got.ndim != 2 or got.shape[0] != len(users):
        raise UseripError(f"bank {bank}: get() returned shape {got.shape} for {len(users)} users")
    ids = np.zeros((n_user_rows, got.shape[1]), dtype=np.int64)
    ids[users["user_idx"].to_numpy(dtype=np.int64)] = got
    names = list(getattr(fb, "profile_names", None) or []) or None
    id_sizes = _bank_id_sizes(bank_meta, names, ids)

    train, val, test = (ctr_examples(data, s, history_len=history_len) for s in ("train", "val", "test"))
    activity = np.bincount(np.asarray(train.user, dtype=np.int64), minlength=n_user_rows)[:n_user_rows]
    theta = _load_personal(Path(profiles_dir), n_user_rows, data_fp) if profiles_dir is not None else None
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
        "codebook_hash": bank_meta.get("codebook_hash"),  # serving refuses a bank with other codebooks
        "history_len": history_len,  # serving rebuilds the history field with the same length
    }
    for b in _as_list(backbones, "backbones"):  # a typo fails before --out is claimed
        _get_backbone(b)
    claimed = claim_output_dir(out, "ctr", overwrite=overwrite)  # inputs checked above; nothing trained yet
    df = run_ctr_table(
        train,
        val,
        test,
        ids=ids,
        id_sizes=id_sizes,
        activity=activity,
        theta=theta,
        user_label_rate=rates,
        backbones=backbones,
        seeds=seeds,
        variants=variants,
        settings=settings,
        out=out,
        profile_names=names,
        meta=meta,
        extra_ids=extra_ids,
        extra_dense=extra_dense,
        reads=reads,
        **kwargs,
    )
    claimed.complete()
    return df
