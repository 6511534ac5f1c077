"""Content k-means baseline: the mean MiniLM embedding of a user's train item titles, k-means'd into IDs.

No LLM at all: it asks how much of the profile IDs' value a plain content summary of the history already
gives. Every train interaction counts (liked or not), as in the behaviour windows of the profile stage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from userip.baselines.features import BaselineFeatures, check_cardinalities, ids_table, quantize
from userip.baselines.text_profile import _as_data
from userip.errors import UseripError

NAME = "content-kmeans"


def mean_title_embeddings(data, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    """(users with train history, their mean title embedding [n, 384], number of titles encoded).

    Only items that occur in the train split are encoded, and only train interactions are averaged.
    """
    from userip.baselines.encoder import encode
    from userip.data import user_histories

    hist = user_histories(data, "train")
    if not hist:
        raise UseripError("no user has train interactions: nothing to embed")
    users = np.asarray(sorted(hist), dtype=np.int64)
    needed = np.unique(np.concatenate([hist[int(u)] for u in users]))
    titles = np.array([""] * (data.n_items + 1), dtype=object)
    titles[data.items["item_idx"].to_numpy()] = data.items["title"].to_numpy(dtype=object)
    item_emb = encode([str(t) for t in titles[needed]], batch_size=batch_size)
    row = np.zeros(data.n_items + 1, dtype=np.int64)
    row[needed] = np.arange(len(needed))
    means = np.stack([item_emb[row[hist[int(u)]]].mean(axis=0, dtype=np.float64) for u in users])
    return users, means.astype(np.float32), len(needed)


def content_kmeans_baseline(data, cardinalities: Mapping[str, int], *, seed: int = 0) -> BaselineFeatures:
    """Mean MiniLM title embedding per user (dense, ``[n_users+1, 384]``) + k-means IDs per cardinality.

    ``data``: a PreparedData (or its directory); ``cardinalities``: profile name -> K.
    """
    from userip.baselines.encoder import ENCODER_NAME

    t_start = time.perf_counter()
    data = _as_data(data)
    cards = check_cardinalities(cardinalities)
    users, means, n_titles = mean_title_embeddings(data)
    t_enc = time.perf_counter() - t_start
    t0 = time.perf_counter()
    ids, codes = quantize(means, cards, seed=seed)
    t_km = time.perf_counter() - t0
    dense = np.zeros((data.n_users + 1, means.shape[1]), dtype=np.float32)
    dense[users] = means
    total = time.perf_counter() - t_start
    meta = {
        "encoder": ENCODER_NAME,
        "model": ENCODER_NAME,
        "cardinalities": cards,
        "seed": seed,
        "n_users": len(users),
        "n_titles_encoded": n_titles,
        "encode_seconds": t_enc,
        "kmeans_seconds": t_km,
        "seconds_total": total,
        "seconds_per_user": total / len(users),
        "data_fingerprint": data.fingerprint,
        "splits_used": ["train"],
    }
    return BaselineFeatures(name=NAME, ids=ids_table(data, users, ids), dense=dense, meta=meta, codebooks=codes)
