"""A small generated dataset in the generic CSV schema: two taste groups, for tests, smoke benchmarks and demos.

Never real MovieLens (its license forbids redistribution); deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

GENRES = ["Action", "Comedy", "Drama", "Sci-Fi", "Children's"]


def write_taste_world(d: str | Path, n_users: int = 40, n_items: int = 50, seed: int = 0,
                      watch_by_taste: bool = False) -> Path:
    """Write ``inter.csv``, ``items.csv``, ``users.csv`` into ``d``: odd users like genres 0-1, even users 2-3.

    Ratings follow the taste; with ``watch_by_taste`` each group also only watches its favourite genres, so the
    behaviour text (not only the ratings) carries the group.
    """
    d = Path(d)
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    item_genre = rng.integers(0, len(GENRES), n_items)
    rows = []
    for u in range(1, n_users + 1):
        fav = {0, 1} if u % 2 else {2, 3}
        t = 880_000_000 + u * 977
        pool = [i for i in range(n_items) if item_genre[i] in fav] if watch_by_taste else list(range(n_items))
        for i in rng.choice(pool, size=min(len(pool), int(rng.integers(15, 30))), replace=False):
            t += int(rng.integers(60, 86_400))
            liked = item_genre[i] in fav
            rows.append((f"u{u}", f"m{i + 1}", int(rng.choice([4, 5]) if liked else rng.choice([1, 2, 3])), t))
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(d / "inter.csv", index=False)
    pd.DataFrame({"item_id": [f"m{i + 1}" for i in range(n_items)],
                  "title": [f"{GENRES[g]} story number {i + 1}" for i, g in enumerate(item_genre)],
                  "genres": [GENRES[g] for g in item_genre]}).to_csv(d / "items.csv", index=False)
    pd.DataFrame({"user_id": [f"u{u}" for u in range(1, n_users + 1)],
                  "age": rng.integers(16, 60, n_users), "gender": ["M", "F"] * (n_users // 2),
                  "occupation": [["student", "engineer"][u % 2] for u in range(n_users)]}).to_csv(
        d / "users.csv", index=False)
    return d
