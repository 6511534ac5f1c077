"""`PreparedData`: a DATA dir in memory (the three tables, the id maps, the split, the stats and the exact
`DataConfig` that produced them).

Where the rest of the data stage lives: `build.prepare` (raw logs -> DATA dir), `datadir` (writing and
loading the DATA dir), `stats` (stats.json), `fingerprint` (what "built on the same data" compares).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.data.config import DataConfig
from userip.data.fingerprint import (
    fingerprint_data,
    fingerprint_ids,
    fingerprint_mismatch,  # noqa: F401 - still imported from here by some stages
    fingerprint_version,
)
from userip.data.split import SPLITS
from userip.errors import UseripError


@dataclass(eq=False)
class PreparedData:
    """A prepared dataset: dense ids (1..n, 0 = unknown/padding), a fixed split, and the config behind them.

    ``interactions``: user_idx, item_idx, rating (float32), label (int8), timestamp (int64), split, [text];
    sorted by user_idx, then timestamp, then original row order. ``items``: item_idx, item_id, title,
    genres (list[str]), year, [text]. ``users``: user_idx, user_id, side features.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    stats: dict[str, Any]
    config: DataConfig
    id_maps: dict[str, Any]
    path: Path | None = None
    _user_lookup: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _item_lookup: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._user_lookup = {str(k): int(v) for k, v in self.id_maps["user"].items()}
        self._item_lookup = {str(k): int(v) for k, v in self.id_maps["item"].items()}
        self._user_ids = np.array([""] + list(self.users.sort_values("user_idx")["user_id"]), dtype=object)
        self._item_ids = np.array([""] + list(self.items.sort_values("item_idx")["item_id"]), dtype=object)

    def __repr__(self) -> str:
        return (
            f"PreparedData(dataset={self.stats.get('dataset')!r}, interactions={len(self.interactions)}, "
            f"users={self.n_users}, items={self.n_items}, path={str(self.path) if self.path else None!r})"
        )

    @property
    def n_users(self) -> int:
        """Largest dense user index (embedding tables need n_users + 1 rows)."""
        return len(self._user_ids) - 1

    @property
    def n_items(self) -> int:
        return len(self._item_ids) - 1

    @property
    def genre_vocab(self) -> list[str]:
        """Genre names; genre code ``i + 1`` is ``genre_vocab[i]`` (0 = padding)."""
        return list(self.id_maps.get("genre", []))

    @property
    def fingerprint(self) -> str:
        """What "built on the same data" checks compare (profiles, bank, baselines, CTR, serving).

        ``v2:`` + sha256 over the id sets and every interaction's user, item, time, rating, label and split
        (`fingerprint_data`): a re-split or relabelled dataset gets another fingerprint. A DATA dir written
        before v2 (its stats have no ``fingerprint_version``) keeps its ids-only fingerprint, so what was built
        on it still matches; re-prepare it to get the full one (then rebuild what was built on it).
        """
        if self._fingerprint is None:
            if fingerprint_version(self.stats) >= 2:
                self._fingerprint = fingerprint_data(self._user_lookup, self._item_lookup, self.interactions)
            else:
                self._fingerprint = fingerprint_ids(self._user_lookup, self._item_lookup)
        return self._fingerprint

    @property
    def has_text(self) -> bool:
        return "text" in self.interactions.columns or "text" in self.items.columns

    def user_index(self, ids: Any) -> np.ndarray:
        """Original user ids (str or int) -> dense int64 indices, 0 for unknown users."""
        return np.array([self._user_lookup.get(str(i), 0) for i in _as_list(ids)], dtype=np.int64)

    def item_index(self, ids: Any) -> np.ndarray:
        return np.array([self._item_lookup.get(str(i), 0) for i in _as_list(ids)], dtype=np.int64)

    def user_ids(self, idx: Any) -> list[str]:
        """Dense indices -> original ids (strings). Index 0 or out of range is an error, not a blank."""
        return _lookup(self._user_ids, idx, "user")

    def item_ids(self, idx: Any) -> list[str]:
        return _lookup(self._item_ids, idx, "item")

    def split(self, name: str) -> pd.DataFrame:
        """Interactions of one split (``train``, ``val``, ``test``)."""
        if name not in SPLITS:
            raise UseripError(f"unknown split '{name}'; expected one of {', '.join(SPLITS)}")
        return self.interactions[self.interactions["split"] == name]


def _as_list(x: Any) -> list:
    if isinstance(x, (str, int, np.integer)):
        return [x]
    return list(x)


def _lookup(table: np.ndarray, idx: Any, noun: str) -> list[str]:
    arr = np.asarray(_as_list(idx), dtype=np.int64)
    bad = (arr < 1) | (arr >= len(table))
    if bad.any():
        raise UseripError(f"{noun} index {int(arr[bad][0])} is out of range 1..{len(table) - 1}")
    return [str(s) for s in table[arr]]
