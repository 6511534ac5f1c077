"""The feature bank as a served model reads it: profile IDs in the model's field order, checked against the
model when opened and re-checked (at most every ``BANK_CHECK_S`` seconds) so a rebuilt bank is picked up
live, and one that no longer fits makes requests fail with ``Unavailable`` (HTTP 503) instead of wrong IDs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from userip.errors import UseripError

#: How often (seconds) the bank meta is re-checked against the model (a rebuilt bank is picked up live).
BANK_CHECK_S = 1.0


class Unavailable(UseripError):
    """The server cannot answer right now (e.g. the bank was rebuilt with codebooks the model never saw)."""


class BankReader:
    """``get(user_ids)`` -> int64 ``[n, m]`` bank IDs, column j for the model's profile field j (0 = unknown).

    ``profile_fields``: (model field, profile name, codebook size) per profile field; ``fingerprint``: the
    data the model was trained on; ``codebook_hash``: the codebooks it was trained with (None: not recorded).
    A location is opened here (and closed by ``close``); an open ``FeatureBank`` is used as it is.
    """

    def __init__(
        self,
        bank: str | os.PathLike | Any,
        profile_fields: list[tuple[str, str, int]],
        *,
        fingerprint: str,
        codebook_hash: str | None,
    ) -> None:
        from userip.bank import FeatureBank, open_bank

        self.profile_fields = profile_fields
        self._fingerprint, self._codebook_hash = fingerprint, codebook_hash
        self._own = not isinstance(bank, FeatureBank)
        self.bank = open_bank(bank) if self._own else bank
        self.location = str(bank) if self._own else repr(bank)
        self._check_lock = threading.Lock()
        try:
            self.opened_meta = self.bank.meta()
            self._cols = self._columns(self.opened_meta)
        except BaseException:
            self.close()
            raise
        self._checked = time.monotonic()

    def _columns(self, bank_meta: dict[str, Any]) -> np.ndarray:
        """Bank column of each profile field. Refuses a bank of other data, of other codebooks than the model
        was trained with (when training recorded their hash), or without the model's profiles and sizes."""
        from userip.bank import check_compatible

        check_compatible(bank_meta, self._fingerprint)
        want, have = self._codebook_hash, bank_meta.get("codebook_hash")
        if want and have and want != have:
            raise UseripError(
                f"bank {self.location} holds IDs of other codebooks (codebook_hash {have[:12]}) than the "
                f"CTR model was trained with ({want[:12]}): its IDs mean something else; rebuild the bank from "
                "the profiles the model was trained on"
            )
        sizes = {p["name"]: int(p["size"]) for p in bank_meta.get("profiles", [])}
        names = [p["name"] for p in bank_meta.get("profiles", [])]
        cols = []
        for fname, pname, size in self.profile_fields:
            if pname not in sizes:
                raise UseripError(
                    f"bank {self.location} has no profile '{pname}' (it has {', '.join(names)}); the model "
                    f"reads {', '.join(p for _, p, _ in self.profile_fields)}"
                )
            if sizes[pname] != size:
                raise UseripError(
                    f"bank {self.location}: profile '{pname}' has codebook size {sizes[pname]}, the model "
                    f"field {fname} was trained with {size}"
                )
            cols.append(names.index(pname))
        return np.asarray(cols, dtype=np.int64)

    def _maybe_recheck(self) -> None:
        """A long-running server picks up bank rebuilds; at most every BANK_CHECK_S, check they still fit."""
        now = time.monotonic()
        if now - self._checked < BANK_CHECK_S:
            return
        with self._check_lock:
            if now - self._checked < BANK_CHECK_S:
                return
            try:
                self._cols = self._columns(self.bank.meta())
            except UseripError as e:
                raise Unavailable(f"the feature bank no longer fits the model: {e}") from None
            self._checked = now

    def get(self, user_ids: Sequence[str]) -> np.ndarray:
        """int64 [n, m] bank IDs in the model's profile-field order (0 = unknown user). One bank ``get``."""
        self._maybe_recheck()
        got = np.asarray(self.bank.get(list(user_ids)), dtype=np.int64)
        cols = self._cols
        if got.ndim != 2 or got.shape[1] <= int(cols.max()):
            raise Unavailable(f"the feature bank returned shape {got.shape}; it changed under the server")
        return got[:, cols]

    def meta(self) -> dict[str, Any]:
        return self.bank.meta()

    def close(self) -> None:
        if self._own and getattr(self, "bank", None) is not None:
            self.bank.close()
