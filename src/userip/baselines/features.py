"""`BaselineFeatures` (what every baseline returns), k-means quantisation to profile-like IDs, save / load.

A saved baseline directory is laid out like a PROFILES dir (``profile_ids.parquet``, ``config.yaml``,
``codebooks.safetensors``, ``profiles.safetensors`` with the dense feature as ``personal``), so the same
bank and CTR commands take it: ``userip bank build --profiles BASELINE_DIR`` gives the baseline IDs, and
``userip ctr train --profiles BASELINE_DIR`` adds its dense feature as the ``+theta`` variant.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from userip.errors import InputError, UseripError
from userip.io import output_dir, read_json, read_yaml, require_complete, write_json, write_yaml

BASELINE_FILES = ("profile_ids.parquet", "profiles.safetensors", "codebooks.safetensors", "config.yaml",
                  "meta.json")


@dataclass(eq=False)
class BaselineFeatures:
    """User features built by a baseline.

    ``ids``: user_idx (int64), user_id (str), then one int64 column per requested cardinality, values 1..K,
    one row per user the baseline covered (users without train history are absent, as in profile_ids).
    ``dense``: ``[n_users + 1, d]`` float32, row = user_idx, rows of uncovered users (and row 0) zero.
    ``meta``: name, models, cardinalities, timings (``seconds_total``, ``seconds_per_user``, ...),
    ``data_fingerprint``. ``texts``: the generated profile per user (text-profile baseline only).
    ``codebooks``: the fitted k-means codes per profile name, ``[K, d]`` (in the L2-normalised space).
    """

    name: str
    ids: pd.DataFrame
    dense: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    texts: pd.DataFrame | None = None
    codebooks: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def cardinalities(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.meta.get("cardinalities", {}).items()}

    def __repr__(self) -> str:
        return (f"BaselineFeatures(name={self.name!r}, users={len(self.ids)}, dense={tuple(self.dense.shape)}, "
                f"cardinalities={self.cardinalities})")


def as_prepared(data: Any):
    """``data`` as a PreparedData: loaded when it is a DATA directory, else returned as given."""
    if isinstance(data, (str, os.PathLike)):
        from userip.data import load_prepared

        return load_prepared(data)
    return data


def describe_behaviour(profile: Mapping[str, Any], which: str = "every train interaction") -> str:
    """What a reader of the behaviour text sees, in words, from a profile config (``behaviour``, ``title_year``,
    ``max_tokens``): the report states it beside every source."""
    mode = profile.get("behaviour", "sequence")
    what = {"sequence": "titles ('Heat; Toy Story')", "rated": "rated text ('Heat: 4; Toy Story: 5')",
            "review": "review text"}.get(mode, str(mode))
    years = ", years dropped" if profile.get("title_year") == "drop" else ""
    return f"{which} as {what}{years}"


def rendered_behaviour(data, behaviour: str = "sequence", title_year: str = "keep") -> dict[int, list[str]]:
    """Per user_idx, one rendered piece per train interaction, in time order, exactly as the profiles' windows
    render it ('Heat: 4' for rated text, years dropped with ``title_year: drop``; a review for ``review``): a
    window is these pieces joined by '; ', so a baseline reading them reads the same behaviour as the profiles
    (and no more). Users without train interactions are absent."""
    from userip.data import behaviour_windows

    return behaviour_windows(data, "train", max_items=1, mode=behaviour, title_year=title_year)


def check_cardinalities(cardinalities: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(cardinalities, Mapping) or not cardinalities:
        raise UseripError("cardinalities must be a non-empty mapping {profile name: K}, e.g. {'hobby': 4}")
    out = {}
    for name, k in cardinalities.items():
        if not isinstance(name, str) or not name or name in ("user_idx", "user_id"):
            raise UseripError(f"cardinalities: bad profile name {name!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
            raise UseripError(f"cardinalities.{name}: expected an integer K >= 1, got {k!r}")
        out[name] = int(k)
    return out


def quantize(
    emb: np.ndarray, cardinalities: Mapping[str, int], *, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """k-means each cardinality on the L2-normalised rows of ``emb`` -> ({name: ids 1..K}, {name: codes}).

    Profile ``i`` is fitted with ``userip.quantize.Codebook`` seeded by ``seed + i``: reproducible, and the
    two profiles do not start from the same k-means++ draw.
    """
    from userip.quantize import Codebook
    from userip.seed import torch_generator

    x = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    x = torch.nn.functional.normalize(x, p=2, dim=1, eps=1e-12)
    ids, codes = {}, {}
    for i, (name, k) in enumerate(check_cardinalities(cardinalities).items()):
        if x.shape[0] < k:
            raise UseripError(f"profile '{name}': k-means with K={k} needs at least {k} users, got {x.shape[0]}")
        cb = Codebook(k)
        cb.fit(x, iters=50, generator=torch_generator(seed + i))
        ids[name] = cb.ids(x).numpy().astype(np.int64)
        codes[name] = cb.state_dict()["codes"]
    return ids, codes


def quantized_features(name: str, data, users: np.ndarray, emb: np.ndarray, cardinalities: Mapping[str, int], *,
                       seed: int, started: float, meta: Mapping[str, Any],
                       texts: pd.DataFrame | None = None) -> BaselineFeatures:
    """How every baseline ends: k-means IDs of ``emb`` (one row per user_idx of ``users``), the dense table
    ``[n_users + 1, d]`` (zero rows for users it does not cover), and ``meta`` plus what every baseline records:
    cardinalities, seed, users, k-means and total seconds (since ``started``, a ``time.perf_counter()``), the
    data fingerprint and the splits read (train only)."""
    t0 = time.perf_counter()
    ids, codes = quantize(emb, cardinalities, seed=seed)
    t_km = time.perf_counter() - t0
    dense = np.zeros((data.n_users + 1, emb.shape[1]), dtype=np.float32)
    dense[users] = emb
    total = time.perf_counter() - started
    meta = {**meta, "cardinalities": dict(cardinalities), "seed": seed, "n_users": len(users), "kmeans_seconds": t_km,
            "seconds_total": total, "seconds_per_user": total / len(users), "data_fingerprint": data.fingerprint,
            "splits_used": ["train"]}
    return BaselineFeatures(name=name, ids=ids_table(data, users, ids), dense=dense, meta=meta, texts=texts,
                            codebooks=codes)


def ids_table(data, users: np.ndarray, ids: Mapping[str, np.ndarray]) -> pd.DataFrame:
    users = np.asarray(users, dtype=np.int64)
    table = pd.DataFrame({"user_idx": users, "user_id": data.user_ids(users) if len(users) else []})
    for name, col in ids.items():
        table[name] = np.asarray(col, dtype=np.int64)
    return table


# ---------------------------------------------------------------------------------------------- save / load
def save_baseline(features: BaselineFeatures, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``features`` to ``out_dir`` (new, empty, or a baseline dir userip wrote: replaced only with
    ``overwrite=True``, and then only its own files). Returns the directory."""
    from safetensors.torch import save_file

    from userip.quantize import save_codebooks

    out = Path(out_dir)
    meta = dict(features.meta)
    cards = features.cardinalities or {c: int(features.ids[c].max()) for c in features.ids.columns[2:]}
    config = {
        "model": str(meta.get("model") or meta.get("encoder") or features.name),
        "template": f"baseline:{features.name}",
        "profiles": [{"name": n, "n_tokens": 0, "codebook_size": k} for n, k in cards.items()],
        "data_fingerprint": meta.get("data_fingerprint") or "unknown",
        "baseline": features.name,
        "seed": meta.get("seed"),
    }
    dense = np.ascontiguousarray(features.dense, dtype=np.float32)
    with output_dir(out, "baseline", overwrite=overwrite) as tmp:
        features.ids.to_parquet(tmp / "profile_ids.parquet", index=False)
        save_file({"personal": torch.from_numpy(dense)}, str(tmp / "profiles.safetensors"),
                  metadata={"baseline": features.name, "model": config["model"]})
        codes = features.codebooks if features.codebooks is not None else _centroids(features, cards)
        save_codebooks(tmp / "codebooks.safetensors", codes, metadata={"baseline": features.name})
        write_yaml(tmp / "config.yaml", config)
        write_json(tmp / "meta.json", {"name": features.name, **meta})
        if features.texts is not None:
            features.texts.to_parquet(tmp / "texts.parquet", index=False)
    return out


def _centroids(features: BaselineFeatures, cards: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Mean normalised dense row per ID (a codebook stand-in when the fitted codes were not kept)."""
    dense = features.dense
    users = features.ids["user_idx"].to_numpy(dtype=np.int64)
    x = dense[users] / np.maximum(np.linalg.norm(dense[users], axis=1, keepdims=True), 1e-12)
    out = {}
    for name, k in cards.items():
        col = features.ids[name].to_numpy(dtype=np.int64)
        c = np.zeros((k, dense.shape[1]), dtype=np.float32)
        for j in range(1, k + 1):
            if (col == j).any():
                c[j - 1] = x[col == j].mean(axis=0)
        out[name] = torch.from_numpy(c)
    return out


def load_baseline(out_dir: str | os.PathLike) -> BaselineFeatures:
    """Read a directory written by :func:`save_baseline`."""
    from safetensors.torch import load_file

    from userip.quantize import load_codebooks

    d = Path(out_dir)
    if not d.is_dir():
        raise UseripError(f"{d}: baseline directory not found")
    require_complete(d, "a baseline")
    missing = [f for f in BASELINE_FILES if not (d / f).is_file()]
    if missing:
        raise InputError(d, f"incomplete baseline directory: missing {', '.join(missing)}")
    try:
        meta = read_json(d / "meta.json")
        ids = pd.read_parquet(d / "profile_ids.parquet")
        dense = load_file(str(d / "profiles.safetensors"))["personal"].numpy()
        texts = pd.read_parquet(d / "texts.parquet") if (d / "texts.parquet").is_file() else None
        codebooks = load_codebooks(d / "codebooks.safetensors")
        read_yaml(d / "config.yaml")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise InputError(d, f"cannot read baseline ({type(e).__name__}: {e})") from None
    ids["user_id"] = ids["user_id"].astype(str)
    name = str(meta.pop("name", d.name))
    return BaselineFeatures(name=name, ids=ids, dense=dense, meta=meta, texts=texts, codebooks=codebooks)
