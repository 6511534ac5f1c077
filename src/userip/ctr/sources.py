"""User-feature sources the CTR table adds to ``base``, their permuted twins and the controls.

A source is one row per user_idx (row 0 = unknown): an ID tuple (``+ids``, ``+hist-ids``, ...; one categorical
field per column) or a vector (``+theta``, ``+text-dense``, ...; one dense field). Its twin has the same rows
permuted jointly across users by :func:`permute_ids` (seeded, never sees a label). The controls are cheap user
summaries a learned source must beat: ``+activity`` (:func:`activity_buckets` of the train interaction count)
and ``+label-rate`` (:func:`quantile_buckets` of the user's train mean rating or label rate), each with as many
buckets as the ID tuple space, capped by the distinct values. :class:`FeatureInputs` joins the sources of a
variant to the example rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from userip.ctr import variants as V
from userip.ctr.inputs import Split
from userip.ctr.spec import FeatureSpec, Field
from userip.ctr.trainer import RowLookup
from userip.errors import UseripError

COLD_QUANTILE = 0.25
PERMUTATION_SEED_OFFSET = 1_000_003  # the permuted twins of seed s use the permutation of seed s + this
_EXTRA = re.compile(r"\+[a-z0-9][a-z0-9_-]*")


# ------------------------------------------------------------------ per-user values
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
    (a user with nothing to measure) -> 0, the unknown code. Equal values share a bucket."""
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
    """Quantile buckets ``1..k`` of per-user counts (row 0 -> 0), ``k = min(n_buckets, distinct counts)``: the
    one definition of an activity bucket (the CTR control and the probe's control)."""
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


# ------------------------------------------------------------------ sources
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


def build_sources(
    n_user_rows: int,
    train: Split,
    *,
    ids,
    id_sizes: Sequence[int],
    activity,
    profile_names: Sequence[str] | None = None,
    theta=None,
    user_label_rate=None,
    extra_ids: Mapping[str, tuple[np.ndarray, Sequence[int]]] | None = None,
    extra_dense: Mapping[str, np.ndarray] | None = None,
    reads: Mapping[str, str] | None = None,
) -> tuple[dict[str, Source], dict]:
    """Every source the table can add (by variant part), checked; and what the report says of them
    (``id_sizes``, ``profile_fields``, the controls' bucket counts, what ``+label-rate`` reads)."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] != n_user_rows:
        raise UseripError(f"ids must have shape [n_users+1, m] = [{n_user_rows}, {len(id_sizes)}] "
                          f"(row = user_idx, row 0 unknown), got {ids.shape}")
    pnames = _profile_field_names(ids.shape[1], profile_names)
    activity = np.asarray(activity)
    if activity.shape != (n_user_rows,):
        raise UseripError(f"activity must have shape [n_users+1] = [{n_user_rows}], got {activity.shape}")
    reads = dict(reads or {})
    sources: dict[str, Source] = {}
    sources["ids"] = _ids_source("ids", ids, id_sizes, pnames, reads.get("+ids", "the profile IDs (feature bank)"),
                                 n_user_rows)
    id_sizes = [f.vocab - 1 for f in sources["ids"].fields]
    tuple_space = int(np.prod([float(s) for s in id_sizes]))

    act_bucket, n_act = activity_buckets(activity, tuple_space)
    sources["activity"] = Source("activity", act_bucket[:, None], [Field("activity", "categorical", vocab=n_act + 1)],
                                 f"train interaction count, {n_act} quantile buckets")
    if user_label_rate is None:
        rate, rate_what = label_rate(train.user, train.label, n_user_rows), "train label rate"
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
    facts = {"id_sizes": id_sizes, "profile_fields": pnames, "activity_buckets": n_act, "label_rate_buckets": n_rate,
             "label_rate_of": rate_what}
    return sources, facts


def _profile_field_names(m: int, profile_names: Sequence[str] | None) -> list[str]:
    names = list(profile_names) if profile_names else [f"p{j}" for j in range(m)]
    if len(names) != m:
        raise UseripError(f"{len(names)} profile names given for an ids array with {m} columns")
    return [f"profile:{n}" for n in names]


def _ids_source(name: str, ids, sizes, field_names: list[str], reads: str, n_user_rows: int) -> Source:
    what = f"{name} ids" if name != "ids" else "ids"
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
    fields = [Field(f, "categorical", vocab=s + 1) for f, s in zip(field_names, sizes, strict=True)]
    return Source(name, np.ascontiguousarray(ids, dtype=np.int64), fields, reads)


def _dense_source(name: str, x, reads: str, n_user_rows: int) -> Source:
    """``[n_users+1, ...]`` -> ``[n_users+1, d]`` float32 divided by one global scale (the linear layer sees
    values of order 1; one scale for all dims keeps the vector's geometry)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2 or x.shape[0] != n_user_rows:
        raise UseripError(f"{name} must have shape [n_users+1, ...] with {n_user_rows} rows, got {x.shape}")
    if not np.isfinite(x).all():
        raise UseripError(f"{name} holds NaN or inf values")
    x = x.reshape(n_user_rows, -1)
    scale = float(x[1:].std()) or 1.0
    table = np.ascontiguousarray(x / scale)
    return Source(name, table, [Field(f"dense:{name}", "dense", dim=table.shape[1])], reads)


# ------------------------------------------------------------------ a variant's model inputs
class FeatureInputs:
    """The feature spec and the train/val/test inputs of one (variant, setting, seed): the base fields (the
    user-id field only ``with_user_id``) and each source's fields, joined to the rows by user index. A table
    (a source, or its twin under one seed) is built once and shared by every fit that reads it."""

    def __init__(self, base: dict[str, Field], splits: list[Split], sources: dict[str, Source]):
        self.base, self.sources = base, sources
        self.tensors = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.cols.items()} for s in splits]
        self._tables: dict[tuple[str, int | None], torch.Tensor] = {}  # (source, permutation seed) -> table

    def __call__(self, variant: str, setting: str, seed: int) -> tuple[FeatureSpec, list[dict]]:
        fields = [f for c, f in self.base.items() if c != "user" or setting == "with_user_id"]
        inputs = [{f.name: t[f.name] for f in fields} for t in self.tensors]
        for part in V.parts(variant):
            src = self.sources[V.source_of(part)]
            table = self._table(src, seed + PERMUTATION_SEED_OFFSET if V.is_permuted(part) else None)
            fields += src.fields  # a twin has exactly its source's fields: the same model, other rows
            for inp, t in zip(inputs, self.tensors, strict=True):
                if src.dense:  # a wide vector per user rides along by user index, never as [N, dim]
                    inp[src.fields[0].name] = RowLookup(table, t["user"])
                else:
                    for j, f in enumerate(src.fields):
                        inp[f.name] = table[t["user"], j]
        return FeatureSpec(fields), inputs

    def _table(self, src: Source, permutation_seed: int | None) -> torch.Tensor:
        key = (src.name, permutation_seed)
        if key not in self._tables:
            self._tables[key] = src.tensor(permutation_seed)
        return self._tables[key]
