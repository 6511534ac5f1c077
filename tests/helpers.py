"""Helpers that several test modules share (fixtures live in conftest.py; a test module never imports another)."""

from __future__ import annotations

import numpy as np

from userip.profile import Corpus

# two disjoint item vocabularies: the planted groups
A = ["Toy Story (1995)", "Jumanji (1995)", "children comedy", "love music"]
B = ["Heat (1995)", "Casino (1995)", "crime thriller", "war western"]


def planted_corpus(tok, n_users=24, max_tokens=64, seed=0) -> Corpus:
    """Two user groups with disjoint item vocabularies: a profile that explains them exists."""
    rng = np.random.default_rng(seed)
    train, held = {}, {}
    for u in range(1, n_users + 1):
        vocab = A if u % 2 else B
        train[u] = ["; ".join(rng.choice(vocab, 6)) for _ in range(3)]
        held[u] = ["; ".join(rng.choice(vocab, 6))]
    act = np.zeros(n_users + 1, dtype=np.int64)
    act[1:] = rng.integers(5, 50, n_users)
    return Corpus.from_text(tok, train, held, n_users, act, max_tokens)
