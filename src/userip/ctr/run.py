"""The CTR table: does a profile-ID field lift a CTR model, honestly?

One run = (backbone, variant, setting, seed) trained on the same split. Variants:

- ``base``: no profile field;
- ``+ids``: one categorical field per profile (the bank IDs);
- ``+ids-permuted``: the same ID tuples permuted jointly across users by a seeded permutation that never
  sees labels (same distribution, no link to behaviour);
- ``+activity``: a quantile bucket of the user's train interaction count, with as many buckets as the ID
  tuple space (prod of codebook sizes), capped by the number of distinct counts;
- ``+theta``: the user's continuous personal soft tokens, flattened, through a linear layer (only when given).

Settings ``with_user_id`` / ``no_user_id`` keep or drop the user-id field. Test metrics are reported for
``all`` users and ``cold`` users (bottom quartile by train interactions).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from userip.ctr.models import _get as _get_backbone
from userip.ctr.models import build_model
from userip.ctr.spec import FeatureSpec, Field
from userip.ctr.table import results_markdown
from userip.ctr.trainer import RowLookup, fit, metrics, predict
from userip.errors import UseripError

VARIANTS = ("base", "+ids", "+ids-permuted", "+activity", "+theta")
SETTINGS = ("with_user_id", "no_user_id")
SLICES = ("all", "cold")
PERMUTATION_SEED_OFFSET = 1_000_003  # the +ids-permuted permutation of seed s uses seed s + this
COLD_QUANTILE = 0.25


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
    """Rows 1..n of ``ids`` permuted jointly (whole tuples) by a seeded permutation; row 0 stays.

    Takes no labels: the permuted IDs keep the exact multiset of ID tuples and lose any link to behaviour.
    """
    ids = np.asarray(ids)
    perm = np.random.default_rng(int(seed)).permutation(len(ids) - 1) + 1
    out = ids.copy()
    out[1:] = ids[perm]
    return out


def activity_buckets(activity: np.ndarray, n_buckets: int) -> tuple[np.ndarray, int]:
    """Quantile buckets ``1..k`` of per-user counts (row 0 -> 0), ``k = min(n_buckets, distinct counts)``."""
    a = np.asarray(activity, dtype=np.float64)
    users = a[1:]
    k = int(max(1, min(n_buckets, len(np.unique(users)))))
    edges = np.quantile(users, np.linspace(0, 1, k + 1)[1:-1]) if k > 1 else np.zeros(0)
    out = np.zeros(len(a), dtype=np.int64)
    out[1:] = np.searchsorted(edges, users, side="right") + 1
    return out, k


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


def _check_profile_inputs(ids, id_sizes, activity, theta, n_user_rows: int, max_user: int):
    want = f"[n_users+1, m] = [{n_user_rows}, {len(id_sizes)}]"
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != len(id_sizes) or ids.shape[0] != n_user_rows or len(id_sizes) == 0:
        raise UseripError(f"ids must have shape {want} (row = user_idx, row 0 unknown), got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise UseripError(f"ids must be integers, got dtype {ids.dtype}")
    if max_user >= n_user_rows:
        raise UseripError(f"examples use user_idx {max_user} but ids has only {n_user_rows} rows")
    sizes = [int(s) for s in id_sizes]
    for j, s in enumerate(sizes):
        col = ids[:, j]
        if s < 1 or col.min() < 0 or col.max() > s:
            raise UseripError(
                f"ids column {j}: values must lie in 0..{s} (id_sizes[{j}]), got {col.min()}..{col.max()}"
            )
    activity = np.asarray(activity)
    if activity.shape != (n_user_rows,):
        raise UseripError(f"activity must have shape [n_users+1] = [{n_user_rows}], got {activity.shape}")
    if theta is not None:
        theta = np.asarray(theta, dtype=np.float32)
        if theta.ndim < 2 or theta.shape[0] != n_user_rows:
            raise UseripError(f"theta must have shape [n_users+1, ...] with {n_user_rows} rows, got {theta.shape}")
        theta = theta.reshape(n_user_rows, -1)
        scale = float(theta[1:].std()) or 1.0  # one global scale: the linear layer sees values of order 1
        theta = theta / scale
    return ids.astype(np.int64), sizes, activity, theta


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


def run_ctr_table(
    train,
    val,
    test,
    *,
    ids: np.ndarray,
    id_sizes: Sequence[int],
    activity: np.ndarray,
    theta: np.ndarray | None = None,
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
) -> pd.DataFrame:
    """Train every (backbone, setting, variant, seed) and return one row per run and test slice.

    ``extra_ids`` / ``extra_dense`` add competing user features as more variants in the same harness (the
    baselines): ``{"+content-ids": (ids [n_users+1, j], sizes)}`` and ``{"+text-dense": array [n_users+1, d]}``.

    ``train``/``val``/``test`` are ``CTRExamples`` (or dicts with the same fields). ``ids`` is
    ``[n_users+1, m]`` (row = user_idx, row 0 = unknown) with column ``j`` in ``0..id_sizes[j]``;
    ``activity`` is ``[n_users+1]`` train interaction counts; ``theta`` (optional) is ``[n_users+1, ...]``
    personal soft tokens. With ``out``, writes ``results.json``, ``results.md`` and
    ``models/<backbone>.safetensors`` (+ ``.json`` spec) of the ``+ids``/``with_user_id`` first-seed model.
    """
    backbones = _as_list(backbones, "backbones")
    for b in backbones:
        _get_backbone(b)
    seeds = list(range(int(seeds))) if isinstance(seeds, int | np.integer) else [int(s) for s in seeds]
    if not seeds:
        raise UseripError("no seeds given")
    extra_ids, extra_dense = dict(extra_ids or {}), dict(extra_dense or {})
    default_variants = [v for v in VARIANTS if v != "+theta" or theta is not None] + list(extra_ids) + list(
        extra_dense
    )
    variants = _as_list(variants or default_variants, "variants", (*VARIANTS, *extra_ids, *extra_dense))
    settings = _as_list(settings, "settings", SETTINGS)
    if "+theta" in variants and theta is None:
        raise UseripError("variant '+theta' needs theta (the personal soft tokens, e.g. from --profiles)")

    parts = [_read_examples(ex, name) for ex, name in ((train, "train"), (val, "val"), (test, "test"))]
    splits = [p[0] for p in parts]
    base = _base_fields(splits, [p[1] for p in parts])
    n_user_rows = base["user"].vocab
    max_user = max(int(s.user.max()) for s in splits)
    ids, id_sizes, activity, theta = _check_profile_inputs(ids, id_sizes, activity, theta, n_user_rows, max_user)
    pnames = _profile_field_names(ids.shape[1], profile_names)
    tuple_space = int(np.prod([float(s) for s in id_sizes]))
    act_bucket, n_act = activity_buckets(activity, tuple_space)
    cold_mask, cold_threshold = cold_users(activity)
    theta_t = torch.from_numpy(np.ascontiguousarray(theta)) if theta is not None else None

    tensors = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.cols.items()} for s in splits]
    users_t = [t["user"] for t in tensors]
    ids_t = torch.from_numpy(ids)
    train_y = torch.from_numpy(splits[0].label)
    test_slices = {"all": np.ones(len(splits[2].label), dtype=bool), "cold": cold_mask[splits[2].user]}

    def features(variant: str, setting: str, seed: int) -> tuple[FeatureSpec, list[dict]]:
        fields = [f for c, f in base.items() if c != "user" or setting == "with_user_id"]
        inputs = [{f.name: t[f.name] for f in fields} for t in tensors]
        if variant in ("+ids", "+ids-permuted"):
            table = ids_t if variant == "+ids" else torch.from_numpy(permute_ids(ids, seed + PERMUTATION_SEED_OFFSET))
            for j, (name, size) in enumerate(zip(pnames, id_sizes, strict=True)):
                fields.append(Field(name, "categorical", vocab=size + 1))
                for inp, u in zip(inputs, users_t, strict=True):
                    inp[name] = table[u, j]
        elif variant == "+activity":
            fields.append(Field("activity", "categorical", vocab=n_act + 1))
            for inp, u in zip(inputs, users_t, strict=True):
                inp["activity"] = torch.from_numpy(act_bucket)[u]
        elif variant == "+theta":
            fields.append(Field("theta", "dense", dim=theta_t.shape[1]))
            for inp, u in zip(inputs, users_t, strict=True):
                inp["theta"] = RowLookup(theta_t, u)
        elif variant in extra_ids:
            table, sizes = extra_ids[variant]
            table_t = torch.from_numpy(np.ascontiguousarray(table, dtype=np.int64))
            for j, size in enumerate(sizes):
                name = f"extra:{variant.lstrip('+')}:{j}"
                fields.append(Field(name, "categorical", vocab=int(size) + 1))
                for inp, u in zip(inputs, users_t, strict=True):
                    inp[name] = table_t[u, j]
        elif variant in extra_dense:
            dense = np.asarray(extra_dense[variant], dtype=np.float32)
            dense = dense / (dense.std() + 1e-8)  # one global scale, as for +theta
            dense_t = torch.from_numpy(np.ascontiguousarray(dense.reshape(dense.shape[0], -1)))
            name = f"extra:{variant.lstrip('+')}"
            fields.append(Field(name, "dense", dim=dense_t.shape[1]))
            for inp, u in zip(inputs, users_t, strict=True):
                inp[name] = RowLookup(dense_t, u)
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
    info = {
        "n_rows": {s.name: len(s.label) for s in splits},
        "n_users": n_user_rows - 1,
        "id_sizes": id_sizes,
        "profile_fields": pnames,
        "activity_buckets": n_act,
        "cold_threshold": cold_threshold,
        "cold_test_rows": int(test_slices["cold"].sum()),
        "permutation_seed": f"seed + {PERMUTATION_SEED_OFFSET}",
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
    if out is not None:
        _write_results(out, rows, fits, info, final=df)
    return df


def _write_results(out: Path, rows, fits, info, final: pd.DataFrame | None = None) -> None:
    from userip.io import atomic_path, write_json

    write_json(out / "results.json", {"meta": info, "runs": _json_safe(rows), "fits": _json_safe(fits)})
    if final is not None:
        notes = [
            f"Cold slice: users with <= {info['cold_threshold']:g} train interactions "
            f"({info['cold_test_rows']} test rows). `+activity` uses {info['activity_buckets']} buckets."
        ]
        max_epochs = info["train"]["max_epochs"]
        hit = sum(f["epochs"] >= max_epochs for f in fits)
        if hit:
            notes.append(
                f"{hit} of {len(fits)} runs stopped at max_epochs={max_epochs} without early stopping: "
                "they may be under-trained (raise --max-epochs or --lr)."
            )
        with atomic_path(out / "results.md") as tmp:
            tmp.write_text(results_markdown(final, notes=notes))


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
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

    f = Path(profiles_dir) / "profiles.safetensors"
    if not f.exists():
        raise UseripError(f"--profiles {profiles_dir}: no profiles.safetensors there")
    cfg_file = Path(profiles_dir) / "config.yaml"
    if cfg_file.exists() and data_fp is not None:
        from userip.io import read_yaml

        fp = (read_yaml(cfg_file) or {}).get("data_fingerprint")
        if fp is not None and fp != data_fp:
            raise UseripError(
                f"profiles {profiles_dir} were fitted on other data: data_fingerprint {fp} "
                f"!= prepared data fingerprint {data_fp}"
            )
    tensors = load_file(str(f))
    key = "personal" if "personal" in tensors else "theta" if "theta" in tensors else None
    if key is None:
        raise UseripError(f"{f}: has neither 'personal' nor 'theta' (found {sorted(tensors)})")
    arr = tensors[key]
    if arr.shape[0] != n_user_rows:
        raise UseripError(f"{f}: '{key}' has {arr.shape[0]} rows, the data has n_users+1 = {n_user_rows}")
    return arr.astype(np.float32)


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
    overwrite: bool = False,
    **kwargs,
) -> pd.DataFrame:
    """Run the CTR table on prepared data with IDs from a feature bank; writes ``OUT/results.{json,md}``
    and ``OUT/models/``. ``kwargs`` go to :func:`run_ctr_table` (lr, batch_size, max_epochs, ...).

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
        raise UseripError(
            f"bank {bank} was built on other data: bank data_fingerprint {bank_fp} != "
            f"fingerprint {data_fp} of {data_dir}"
        )
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
    meta = {
        "data": str(data_dir),
        "bank": str(bank),
        "profiles": str(profiles_dir) if profiles_dir else None,
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
        backbones=backbones,
        seeds=seeds,
        variants=variants,
        settings=settings,
        out=out,
        profile_names=names,
        meta=meta,
        **kwargs,
    )
    claimed.complete()
    return df
