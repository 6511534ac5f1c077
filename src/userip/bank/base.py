"""What every feature-bank backend shares: the lifecycle (open/closed, lock, context manager), the reading of
``get``'s argument, and the checks that start every ``build``.

A backend keeps the build it answers from in ``self._snap`` (an object with ``names`` and ``meta``; ``None``
before the first build) and implements ``_live`` (the snapshot to answer from now, after following any
rebuild) and ``_release`` (drop a snapshot's connections when the bank is closed).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import pandas as pd

from userip.bank.protocol import finalize_meta, normalise_meta, validate_ids_table
from userip.errors import UseripError


class BankBase:
    """Base of ``SQLiteBank`` and ``RedisBank``; ``where`` (a path, or a URL with the password masked) starts
    every error message."""

    backend = ""  # recorded in the meta of every build

    def __init__(self, where: str, *, reload: bool) -> None:
        self._where = where
        self._reload = reload
        self._lock = threading.RLock()
        self._closed = False
        self._snap: Any = None

    # ------------------------------------------------------------------ for the backends
    def _live(self) -> Any:  # pragma: no cover - every backend overrides it
        raise NotImplementedError

    def _release(self, snap: Any) -> None:  # pragma: no cover - every backend overrides it
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise UseripError(f"{self._where}: feature bank is closed")

    def _built(self) -> Any:
        """The snapshot this handle holds; an error if the bank is closed or was never built."""
        self._check_open()
        snap = self._snap
        if snap is None:
            raise UseripError(f"{self._where}: feature bank has not been built yet")
        return snap

    @staticmethod
    def _user_ids(user_ids: Sequence[str]) -> list[str | None]:
        """``get``'s argument as a list of strings (None kept: it is an unknown user like any other)."""
        if isinstance(user_ids, (str, bytes)):
            raise TypeError("get() takes a sequence of user ids, not a single string; use get([user_id])")
        ids = list(user_ids)
        if not all(type(u) is str for u in ids):
            ids = [u if isinstance(u, str) or u is None else str(u) for u in ids]
        return ids

    def _start_build(
        self, ids_table: pd.DataFrame, meta: dict[str, Any], source: object
    ) -> tuple[list[str], dict[str, Any]]:
        """Check a build's input; returns the profile names (column order) and the meta to store."""
        self._check_open()
        meta = normalise_meta(meta, source=source)
        validate_ids_table(ids_table, meta, source=source)
        names = [p["name"] for p in meta["profiles"]]
        return names, finalize_meta(meta, n_users=len(ids_table), backend=self.backend)

    # ------------------------------------------------------------------ protocol
    @property
    def profile_names(self) -> list[str]:
        return list(self._live().names)

    def meta(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._live().meta))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            snap, self._snap = self._snap, None
        self._release(snap)

    def __enter__(self) -> BankBase:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where!r})"
