"""The CTR table's inputs: train/val/test examples checked and turned into base fields.

``CTRExamples`` (:func:`userip.data.ctr_examples`) or any object or dict with the same fields: ``user``,
``item``, ``label`` (0/1), ``vocab`` (table sizes), and optionally ``genres`` / ``history`` ([N, L] codes) and
``side`` (one code column per side feature). Every check names the split and the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from userip.ctr.spec import Field
from userip.errors import UseripError


@dataclass
class Split:
    name: str
    user: np.ndarray  # int64 [N]
    label: np.ndarray  # float32 [N]
    cols: dict[str, np.ndarray]  # base field name -> codes ([N] or [N, L])


def read_splits(train, val, test) -> tuple[list[Split], dict[str, Field]]:
    """The three splits checked, and the base fields they share (by column) with their table sizes."""
    parts = [_read_examples(ex, name) for ex, name in ((train, "train"), (val, "val"), (test, "test"))]
    splits = [p[0] for p in parts]
    base = _base_fields(splits, [p[1] for p in parts])
    n_user_rows = base["user"].vocab
    max_user = max(int(s.user.max()) for s in splits)
    if max_user >= n_user_rows:
        raise UseripError(f"examples use user_idx {max_user} but the user vocab has only {n_user_rows} rows")
    return splits, base


def _attr(ex, name: str):
    if isinstance(ex, dict):
        return ex.get(name)
    return getattr(ex, name, None)


def _read_examples(ex, split: str) -> tuple[Split, dict[str, int]]:
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
    return Split(split, cols["user"], label, cols), vocab


def _vocab_key(col: str) -> str:
    return {"genres": "genre", "history": "item"}.get(col, col.removeprefix("side:"))


def _base_fields(splits: list[Split], vocabs: list[dict[str, int]]) -> dict[str, Field]:
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
