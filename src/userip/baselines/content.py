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
    as_prepared,
    check_cardinalities,
    describe_behaviour,
    quantized_features,
    rendered_behaviour,
)
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
    data = as_prepared(data)
    cards = check_cardinalities(cardinalities)
    users, means, n_titles = mean_title_embeddings(data, behaviour=behaviour, title_year=title_year)
    meta = {
        "encoder": ENCODER_NAME,
        "model": ENCODER_NAME,
        "n_titles_encoded": n_titles,
        "encode_seconds": time.perf_counter() - t_start,
        "behaviour": behaviour,
        "title_year": title_year,
        "reads": f"{describe_behaviour({'behaviour': behaviour, 'title_year': title_year})}; mean "
                 f"{ENCODER_NAME} embedding of the rendered interactions",
    }
    return quantized_features(NAME, data, users, means, cards, seed=seed, started=t_start, meta=meta)
