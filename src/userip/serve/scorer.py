"""Online scoring without an LLM: ``CTRScorer`` holds a trained ``+ids`` CTR model, the feature bank and the
prepared data's feature tables, all loaded once; a request is one bank ``get`` (the user's profile IDs) and
one model forward over the requested items.

Inputs are gathered from the feature tables training used (``userip.serve.inputs``). Unknown users get
index 0 everywhere (no user embedding, side features, history or profile IDs) and are still scored. Unknown
items are *not* scored (their zero embedding would give a meaningless number that a client could rank): they
are reported in ``unknown_items`` instead.

Where the parts live: ``locate`` (what to load from a CTR dir), ``inputs`` (the model's input tensors),
``bank_reader`` (the bank, checked against the model), ``explanations`` (what a profile ID means).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from userip.errors import UseripError
from userip.serve.bank_reader import BankReader
from userip.serve.explanations import CodeExplanation, explanations_for
from userip.serve.inputs import ModelInputs
from userip.serve.locate import choose_model, load_trained_data, read_json, training_record

log = logging.getLogger("userip.serve")

HISTORY_MODES = ("all", "train")


@dataclass
class ScoreResult:
    user_id: str
    item_ids: list[str]  # the known items, in request order (duplicates kept)
    scores: np.ndarray  # float32 click probabilities, aligned with item_ids
    unknown_items: list[str]  # request order, duplicates kept
    known_user: bool
    profile_ids: dict[str, int]


class CTRScorer:
    """Everything a request needs, in memory; ``score`` and ``profile`` are the two online calls.

    ``history``: "all" (the user's whole logged history) or "train" (only the train split) as the history
    input. Thread-safe for concurrent calls (torch forward of an eval model is; the bank has its own lock).
    """

    def __init__(
        self,
        bank: str | os.PathLike | Any,
        ctr_dir: str | os.PathLike,
        data_dir: str | os.PathLike | None = None,
        backbone: str | None = None,
        *,
        explanations: str | os.PathLike | None = None,
        history: str = "all",
    ) -> None:
        from userip.ctr import load_model

        if history not in HISTORY_MODES:
            raise UseripError(f"history must be one of {', '.join(HISTORY_MODES)}, got {history!r}")
        t0 = time.perf_counter()
        self.ctr_dir = Path(ctr_dir)
        results, self.train_meta = training_record(self.ctr_dir)

        # ---- model
        self.model_path = choose_model(self.ctr_dir, backbone)
        self.model = load_model(self.model_path)
        self.model.requires_grad_(False)
        extra = getattr(self.model, "ctr_extra", {})
        self.backbone: str = self.model.ctr_config["backbone"]
        self.variant, self.setting = extra.get("variant"), extra.get("setting")
        self.best_val_auc = read_json(self.model_path).get("best_val_auc")
        self.fields = self.model.ctr_spec.names

        # ---- data and the model's inputs built from it
        self.data_dir, data = load_trained_data(data_dir, self.ctr_dir, results, self.train_meta)
        self.fingerprint = data.fingerprint
        self.n_users, self.n_items = data.n_users, data.n_items
        self._user_lookup = {str(k): int(v) for k, v in data.id_maps["user"].items()}
        self._item_lookup = {str(k): int(v) for k, v in data.id_maps["item"].items()}
        self.history_mode = history
        self.history_len = int(self.train_meta.get("history_len") or 20)
        self.inputs = ModelInputs(self.model, self.model_path, data, self.data_dir, history_len=self.history_len,
                                  history_split="train" if history == "train" else None)
        self.profile_fields = self.inputs.profile_fields
        if not self.profile_fields:  # pragma: no cover - a '+ids' model always has them
            raise UseripError(f"{self.model_path}: the model has no profile fields")

        # ---- bank (last: everything above fails without leaving a connection open)
        self.bank = BankReader(bank, self.profile_fields, fingerprint=self.fingerprint,
                               codebook_hash=self.train_meta.get("codebook_hash"))
        try:
            self.explanations_path, self.explanations = explanations_for(
                explanations, bank, self.ctr_dir, self.train_meta, self.bank.opened_meta
            )
            self._warm_up()
        except BaseException:
            self.close()
            raise
        self.load_s = time.perf_counter() - t0
        log.info(
            "serving %s (%s, %s) from %s: %d users, %d items, profiles %s, bank %s, explanations %s (%.1fs)",
            self.backbone, self.variant, self.setting, self.model_path, self.n_users, self.n_items,
            ", ".join(f"{p}(K={k})" for _, p, k in self.profile_fields), self.bank.location,
            self.explanations_path or "none", self.load_s,
        )

    def _warm_up(self) -> None:
        for n in (1, 8, 64):
            self._forward(np.zeros(n, dtype=np.int64), np.zeros((n, len(self.profile_fields)), dtype=np.int64),
                          np.ones(n, dtype=np.int64))

    # ------------------------------------------------------------------ online calls
    def user_index(self, user_id: str) -> int:
        return self._user_lookup.get(user_id, 0)

    def item_index(self, item_ids: Sequence[str]) -> np.ndarray:
        get = self._item_lookup.get
        return np.fromiter((get(i, 0) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def profile_ids(self, user_ids: Sequence[str]) -> np.ndarray:
        """int64 [n, m] bank IDs in the model's profile-field order (0 = unknown user). One bank ``get``."""
        return self.bank.get(user_ids)

    def _forward(self, users: np.ndarray, profile_ids: np.ndarray, items: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(self.model(self.inputs(users, profile_ids, items))).numpy()

    def score(self, user_id: str, item_ids: Sequence[str]) -> ScoreResult:
        """Click probabilities of ``item_ids`` for ``user_id``: one bank get, one forward (known items only)."""
        ids = self.profile_ids([user_id])[0]
        u = self.user_index(user_id)
        idx = self.item_index(item_ids)
        known = idx > 0
        unknown = [item_ids[i] for i in np.flatnonzero(~known)] if not known.all() else []
        items = idx[known] if unknown else idx
        n = len(items)
        scores = (
            self._forward(np.full(n, u, dtype=np.int64), np.repeat(ids[None], n, axis=0), items)
            if n
            else np.zeros(0, dtype=np.float32)
        )
        kept = [i for i, k in zip(item_ids, known.tolist(), strict=True) if k] if unknown else list(item_ids)
        return ScoreResult(
            user_id=user_id,
            item_ids=kept,
            scores=scores,
            unknown_items=unknown,
            known_user=bool(u > 0 or ids.any()),
            profile_ids={p: int(v) for (_, p, _), v in zip(self.profile_fields, ids.tolist(), strict=True)},
        )

    def score_pairs(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """Offline helper: one probability per (user, item) pair (NaN for unknown items)."""
        if len(user_ids) != len(item_ids):
            raise UseripError(f"{len(user_ids)} user ids but {len(item_ids)} item ids")
        ids = self.profile_ids(user_ids)
        users = np.array([self.user_index(u) for u in user_ids], dtype=np.int64)
        idx = self.item_index(item_ids)
        out = np.full(len(idx), np.nan, dtype=np.float32)
        k = idx > 0
        if k.any():
            out[k] = self._forward(users[k], ids[k], idx[k])
        return out

    def profile(self, user_id: str) -> dict[str, Any]:
        ids = self.profile_ids([user_id])[0]
        profiles = {}
        for (_, pname, _), code in zip(self.profile_fields, ids.tolist(), strict=True):
            ex = self.explanations.get(pname, {}).get(int(code)) if code else None
            ex = ex or CodeExplanation()
            profiles[pname] = {
                "id": int(code),
                "words": ex.words,
                "phrase": ex.phrase,
                "genres": ex.genres,
                "titles": ex.titles,
            }
        return {"user_id": user_id, "known": bool(ids.any()), "profiles": profiles}

    def meta(self) -> dict[str, Any]:
        from userip import __version__

        return {
            "userip_version": __version__,
            "model": {
                "backbone": self.backbone,
                "variant": self.variant,
                "setting": self.setting,
                "fields": list(self.fields),
                "best_val_auc": self.best_val_auc,
                "path": str(self.model_path),
            },
            "backbone": self.backbone,
            "variant": self.variant,
            "profiles": [{"name": p, "size": k, "field": f} for f, p, k in self.profile_fields],
            "n_users": self.n_users,
            "n_items": self.n_items,
            "data": {
                "path": str(self.data_dir),
                "fingerprint": self.fingerprint,
                "history": self.history_mode,
                "history_len": self.history_len,
            },
            "bank": {"location": self.bank.location, "meta": self.bank.meta()},
            "explanations": str(self.explanations_path) if self.explanations_path else None,
        }

    def close(self) -> None:
        self.bank.close()
