"""Content k-means baseline: the mean MiniLM embedding of a user's train behaviour, k-means'd into IDs.

No LLM at all: it asks how much of the profile IDs' value a plain content summary of the history already
gives. It reads what the profiles read: every train interaction (liked or not), rendered as in the profile
stage's behaviour windows ('Heat: 4' when the profiles read rated text, the title otherwise), so a lift over
it is not just more input.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from userip.baselines.features import (
    BaselineFeatures,
    check_cardinalities,
    describe_behaviour,
    ids_table,
    quantize,
    rendered_behaviour,
)
from userip.baselines.text_profile import _as_data
from userip.errors import UseripError

NAME = "content-kmeans"


def mean_title_embeddings(data, *, batch_size: int = 64, behaviour: str = "sequence",
                          title_year: str = "keep") -> tuple[np.ndarray, np.ndarray, int]:
    """(users with train history, their mean embedding [n, 384], number of distinct pieces encoded).

    Each train interaction is rendered as the profiles render it (:func:`rendered_behaviour`: the title for
    ``sequence``, 'Title: 4' for ``rated``); each distinct piece is encoded once and a user's embedding is
    the mean over their train interactions. Only train interactions are read.
    """
    from userip.baselines.encoder import encode

    pieces = rendered_behaviour(data, behaviour, title_year)
    if not pieces:
        raise UseripError("no user has train interactions: nothing to embed")
    users = np.asarray(sorted(pieces), dtype=np.int64)
    vocab = sorted({t for u in users for t in pieces[int(u)]})
    row = {t: i for i, t in enumerate(vocab)}
    emb = encode(vocab, batch_size=batch_size)
    means = np.stack([emb[[row[t] for t in pieces[int(u)]]].mean(axis=0, dtype=np.float64) for u in users])
    return users, means.astype(np.float32), len(vocab)


def content_kmeans_baseline(data, cardinalities: Mapping[str, int], *, seed: int = 0, behaviour: str = "sequence",
                            title_year: str = "keep") -> BaselineFeatures:
    """Mean MiniLM embedding of the user's rendered train behaviour (dense, ``[n_users+1, 384]``) + k-means IDs
    per cardinality.

    ``data``: a PreparedData (or its directory); ``cardinalities``: profile name -> K; ``behaviour`` and
    ``title_year``: the profiles' rendering (their ``ProfileConfig``), so both read the same behaviour.
    """
    from userip.baselines.encoder import ENCODER_NAME

    t_start = time.perf_counter()
    data = _as_data(data)
    cards = check_cardinalities(cardinalities)
    users, means, n_titles = mean_title_embeddings(data, behaviour=behaviour, title_year=title_year)
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
        "behaviour": behaviour,
        "title_year": title_year,
        "reads": f"{describe_behaviour({'behaviour': behaviour, 'title_year': title_year})}; mean "
                 f"{ENCODER_NAME} embedding of the rendered interactions",
    }
    return BaselineFeatures(name=NAME, ids=ids_table(data, users, ids), dense=dense, meta=meta, codebooks=codes)
