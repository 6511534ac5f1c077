"""Online scoring without an LLM: a trained ``+ids`` CTR model, profile IDs from the feature bank, and the
item/user feature tables of the prepared data, all loaded once.

A request is one bank ``get`` (the user's profile IDs) and one model forward over the requested items.
Inputs are rebuilt exactly as ``userip.data.ctr_examples`` built them for training:

- ``user`` / ``item``: dense indices from the data's id maps (0 = unknown);
- ``genres``: the item's genre codes (``genre_matrix``);
- ``side:<name>``: the user's side-feature code (``side_feature_codes``);
- ``history``: the user's ``history_len`` most recent items, most recent last. Training used every event
  before the one scored (any split); at serving time that is the user's whole logged history
  (``history="all"``, default), or only the train split with ``history="train"``;
- ``profile:<name>``: the bank ID (0 = unknown user).

Unknown users get index 0 everywhere (no user embedding, side features, history or profile IDs) and are
still scored. Unknown items are *not* scored (their zero embedding would give a meaningless number that a
client could rank): they are reported in ``unknown_items`` instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from userip.errors import UseripError
from userip.io import sha256_file

log = logging.getLogger("userip.serve")

HISTORY_MODES = ("all", "train")
#: How often (seconds) the bank meta is re-checked against the model (a rebuilt bank is picked up live).
BANK_CHECK_S = 1.0
_KNOWN_KINDS = ("user", "item", "genres", "history", "side", "profile")


class Unavailable(UseripError):
    """The server cannot answer right now (e.g. the bank was rebuilt with codebooks the model never saw)."""


@dataclass
class ScoreResult:
    user_id: str
    item_ids: list[str]  # the known items, in request order (duplicates kept)
    scores: np.ndarray  # float32 click probabilities, aligned with item_ids
    unknown_items: list[str]  # request order, duplicates kept
    known_user: bool
    profile_ids: dict[str, int]


@dataclass
class CodeExplanation:
    words: list[str] = field(default_factory=list)
    phrase: str | None = None
    genres: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- locating files
def _read_json(path: Path) -> Any:
    from userip.io import read_json

    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise UseripError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from None


def models_dir(ctr_dir: Path) -> Path:
    """``CTR/models``; a run dir (``RUN/ctr/models``) is accepted too."""
    for d in (ctr_dir / "models", ctr_dir / "ctr" / "models"):
        if d.is_dir():
            return d
    raise UseripError(f"{ctr_dir}: no models/ directory here (expected the --out dir of `userip ctr train`)")


def choose_model(ctr_dir: Path, backbone: str | None) -> Path:
    """The model's ``.json``: ``backbone`` if given, else the first (by name) trained with profile IDs."""
    mdir = models_dir(ctr_dir)
    found: dict[str, dict] = {}
    for cfg_path in sorted(mdir.glob("*.json")):
        if cfg_path.with_suffix(".safetensors").is_file():
            found[cfg_path.stem] = _read_json(cfg_path)
    if not found:
        raise UseripError(f"{mdir}: no trained models (<backbone>.safetensors + .json)")
    usable = [name for name, cfg in found.items() if cfg.get("variant") == "+ids"]
    listing = ", ".join(f"{n} ({c.get('variant')})" for n, c in found.items())
    if backbone is None:
        if not usable:
            raise UseripError(
                f"{mdir}: no model was trained with the profile IDs (variant '+ids'); found {listing}. "
                "Train with --variants including +ids"
            )
        return mdir / f"{usable[0]}.json"
    if backbone not in found:
        raise UseripError(f"{mdir}: no model for backbone '{backbone}'; found {listing}")
    if found[backbone].get("variant") != "+ids":
        raise UseripError(
            f"{mdir / backbone}.json: variant {found[backbone].get('variant')!r} does not read the profile IDs; "
            "serving needs a '+ids' model"
        )
    return mdir / f"{backbone}.json"


def resolve_data_dir(data_dir: str | os.PathLike | None, ctr_dir: Path, meta: dict) -> Path:
    """``--data`` if given, else the ``data`` recorded by ``train_ctr`` in results.json, else ``RUN/data``."""
    if data_dir is not None:
        return Path(data_dir)
    tried: list[Path] = []
    rec = meta.get("data")
    if rec:
        p = Path(rec)
        tried += [p] if p.is_absolute() else [p, ctr_dir.parent / p, ctr_dir / p]
    tried += [ctr_dir.parent / "data", ctr_dir / "data"]
    for c in tried:
        if (c / "stats.json").is_file():
            return c
    raise UseripError(
        f"cannot find the prepared data the CTR model was trained on (tried {', '.join(map(str, tried))}); "
        "pass --data"
    )



def find_explanations(bank: object, ctr_dir: Path, meta: dict) -> Path | None:
    """``explanations.json`` of the run: next to the bank, the ctr dir, or in the profiles dir."""
    roots: list[Path] = []
    if isinstance(bank, str | os.PathLike) and "://" not in str(bank):
        roots.append(Path(bank).parent)
    roots.append(ctr_dir.parent)
    if meta.get("profiles"):
        roots.append(Path(meta["profiles"]))
    roots += [r / "profiles" for r in list(roots)]
    for r in dict.fromkeys(roots):
        if (r / "explanations.json").is_file():
            return r / "explanations.json"
    return None


def load_explanations(
    path: Path | None, bank_meta: dict[str, Any]
) -> tuple[dict[str, dict[int, CodeExplanation]], str | None]:
    """Per profile and code: nearest words, phrase, over-represented genres/titles; ``({}, reason)`` when the
    file is absent, unreadable, or was made for other codebooks (an explanation of another code is worse
    than none)."""
    if path is None:
        return {}, "no explanations.json found"
    try:
        raw = _read_json(Path(path))
        profiles = raw["profiles"]
        if not isinstance(profiles, dict):
            raise TypeError("'profiles' is not a mapping")
    except (UseripError, KeyError, TypeError) as e:
        log.warning("ignoring explanations %s: %s", path, e)
        return {}, f"unreadable: {e}"
    cb_hash = bank_meta.get("codebook_hash")
    pdir = raw.get("profiles_dir")
    cb_file = Path(pdir) / "codebooks.safetensors" if pdir else None
    if cb_hash and cb_file is not None and cb_file.is_file() and sha256_file(cb_file) != cb_hash:
        log.warning("ignoring explanations %s: made for other codebooks than the bank's", path)
        return {}, "made for other codebooks than the bank's"
    sizes = {p["name"]: p["size"] for p in bank_meta.get("profiles", [])}
    out: dict[str, dict[int, CodeExplanation]] = {}
    for name, prof in profiles.items():
        if name not in sizes or not isinstance(prof, dict):
            continue
        k = prof.get("codebook_size")
        if k is not None and k != sizes[name]:
            log.warning("ignoring explanations of profile %s: codebook size %s, bank has %s", name, k, sizes[name])
            continue
        codes: dict[int, CodeExplanation] = {}
        for c in prof.get("codes") or []:
            try:
                codes[int(c["code"])] = CodeExplanation(
                    words=[str(w).strip() for w in c.get("tokens") or []],
                    phrase=None if c.get("phrase") is None else str(c["phrase"]),
                    genres=[str(g["genre"]) for g in c.get("genres") or []],
                    titles=[str(t["title"]) for t in c.get("titles") or []],
                )
            except (KeyError, TypeError, ValueError) as e:
                log.warning("ignoring a malformed code entry of profile %s in %s: %s", name, path, e)
        out[name] = codes
    return out, None


# ---------------------------------------------------------------------------------------------- the scorer
class Scorer:
    """Everything a request needs, in memory; ``score`` and ``profile`` are the two online calls.

    Thread-safe for concurrent calls (torch forward of an eval model is; the bank has its own lock).
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
        from userip.bank import FeatureBank, check_compatible, open_bank
        from userip.ctr import load_model
        from userip.data import load_prepared
        from userip.data.ctr import genre_matrix, side_feature_codes

        if history not in HISTORY_MODES:
            raise UseripError(f"history must be one of {', '.join(HISTORY_MODES)}, got {history!r}")
        t0 = time.perf_counter()
        self.ctr_dir = Path(ctr_dir)
        if not self.ctr_dir.is_dir():
            raise UseripError(f"{self.ctr_dir}: CTR directory not found (the --out dir of `userip ctr train`)")
        results = self.ctr_dir / "results.json"
        if not results.is_file() and (self.ctr_dir / "ctr" / "results.json").is_file():
            results = self.ctr_dir / "ctr" / "results.json"
        from userip.io import require_complete

        require_complete(results.parent, "a CTR model to serve")  # an unreadable format names its version
        self.train_meta: dict[str, Any] = dict(_read_json(results).get("meta") or {}) if results.is_file() else {}

        # ---- model
        self.model_path = choose_model(self.ctr_dir, backbone)
        self.model = load_model(self.model_path)
        self.model.requires_grad_(False)
        extra = getattr(self.model, "ctr_extra", {})
        self.backbone: str = self.model.ctr_config["backbone"]
        self.variant, self.setting = extra.get("variant"), extra.get("setting")
        self.best_val_auc = _read_json(self.model_path).get("best_val_auc")
        spec = self.model.ctr_spec
        self.fields = spec.names

        # ---- data
        self.data_dir = resolve_data_dir(data_dir, self.ctr_dir, self.train_meta)
        data = load_prepared(self.data_dir)
        self.fingerprint = data.fingerprint
        fp = self.train_meta.get("data_fingerprint")
        if fp and fp != self.fingerprint:
            from userip.data.prepared import fingerprint_mismatch

            raise UseripError(f"{self.data_dir}: not the data the CTR model was trained on: "
                              + fingerprint_mismatch(f"the CTR model ({results})", fp, self.fingerprint))
        self.n_users, self.n_items = data.n_users, data.n_items
        self._user_lookup = {str(k): int(v) for k, v in data.id_maps["user"].items()}
        self._item_lookup = {str(k): int(v) for k, v in data.id_maps["item"].items()}
        self.history_mode = history
        self.history_len = int(self.train_meta.get("history_len") or 20)

        # ---- per-field input tables, checked against the model's embedding sizes
        sizes = dict(zip(extra.get("profile_fields") or [], extra.get("id_sizes") or [], strict=False))
        side_codes, side_vocab, _ = side_feature_codes(data)
        self._plan: list[tuple[str, str, Any]] = []
        self.profile_fields: list[tuple[str, str, int]] = []  # (field, profile name, codebook size)
        for f in spec.fields:
            name = f.name
            if name == "user":
                kind, table, want = "user", None, self.n_users + 1
            elif name == "item":
                kind, table, want = "item", None, self.n_items + 1
            elif name == "genres":
                kind, table, want = "genres", torch.from_numpy(genre_matrix(data)), len(data.genre_vocab) + 1
            elif name == "history":
                kind, table, want = "history", torch.from_numpy(self._history_table(data)), None
            elif name.startswith("side:") and name[5:] in side_codes:
                kind, table, want = "side", side_codes[name[5:]], side_vocab[name[5:]]
            elif name.startswith("profile:"):
                pname = name[len("profile:") :]
                size = int(sizes.get(name, f.vocab - 1))
                kind, table, want = "profile", pname, size + 1
                self.profile_fields.append((name, pname, size))
            else:
                raise UseripError(
                    f"{self.model_path}: field '{name}' cannot be built at serving time (serving builds "
                    f"{', '.join(_KNOWN_KINDS)} fields)"
                )
            if want is not None and f.kind != "sequence" and f.vocab != want:
                raise UseripError(
                    f"{self.model_path}: field '{name}' has {f.vocab} embedding rows, but {self.data_dir} needs "
                    f"{want}: the model was trained on other data"
                )
            self._plan.append((name, kind, table))
        if not self.profile_fields:  # pragma: no cover - a '+ids' model always has them
            raise UseripError(f"{self.model_path}: the model has no profile fields")

        # ---- bank (last: everything above fails without leaving a connection open)
        self._own_bank = not isinstance(bank, FeatureBank)
        self.bank = open_bank(bank) if self._own_bank else bank
        self.bank_location = str(bank) if self._own_bank else repr(bank)
        self._check_lock = threading.Lock()
        try:
            bank_meta = self.bank.meta()
            check_compatible(bank_meta, self.fingerprint)
            self._check_bank(bank_meta)
            self._bank_cols = self._bank_columns(bank_meta)
            self._bank_checked = time.monotonic()
            self.explanations_path = (
                Path(explanations)
                if explanations is not None
                else find_explanations(bank, self.ctr_dir, self.train_meta)
            )
            if explanations is not None and not self.explanations_path.is_file():
                raise UseripError(f"{self.explanations_path}: explanations file not found")
            self.explanations, why = load_explanations(self.explanations_path, bank_meta)
            if why is not None:
                self.explanations_path = None
            self._warm_up()
        except BaseException:
            self.close()
            raise
        self.load_s = time.perf_counter() - t0
        log.info(
            "serving %s (%s, %s) from %s: %d users, %d items, profiles %s, bank %s, explanations %s (%.1fs)",
            self.backbone, self.variant, self.setting, self.model_path, self.n_users, self.n_items,
            ", ".join(f"{p}(K={k})" for _, p, k in self.profile_fields), self.bank_location,
            self.explanations_path or "none", self.load_s,
        )

    # ------------------------------------------------------------------ loading helpers
    def _history_table(self, data) -> np.ndarray:
        """[n_users + 1, H] the user's H most recent items (time order, most recent last, 0-padded left)."""
        h = self.history_len
        table = np.zeros((self.n_users + 1, h), dtype=np.int64)
        inter = data.interactions
        if self.history_mode == "train":
            inter = inter[inter["split"] == "train"]
        if h == 0 or len(inter) == 0:
            return table
        inter = inter.sort_values(["user_idx", "timestamp"], kind="stable")
        rank = inter.groupby("user_idx", sort=False).cumcount(ascending=False).to_numpy()
        keep = rank < h
        users = inter["user_idx"].to_numpy(dtype=np.int64)[keep]
        table[users, h - 1 - rank[keep]] = inter["item_idx"].to_numpy(dtype=np.int64)[keep]
        return table

    def _check_bank(self, bank_meta: dict[str, Any]) -> None:
        """The bank must hold the codebooks the model was trained with (when train_ctr recorded their hash)."""
        want = self.train_meta.get("codebook_hash")
        have = bank_meta.get("codebook_hash")
        if want and have and want != have:
            raise UseripError(
                f"bank {self.bank_location} holds IDs of other codebooks (codebook_hash {have[:12]}) than the "
                f"CTR model was trained with ({want[:12]}): its IDs mean something else; rebuild the bank from "
                "the profiles the model was trained on"
            )

    def _bank_columns(self, bank_meta: dict[str, Any]) -> np.ndarray:
        """Bank column of each profile field, checking names and codebook sizes."""
        sizes = {p["name"]: int(p["size"]) for p in bank_meta.get("profiles", [])}
        names = [p["name"] for p in bank_meta.get("profiles", [])]
        cols = []
        for fname, pname, size in self.profile_fields:
            if pname not in sizes:
                raise UseripError(
                    f"bank {self.bank_location} has no profile '{pname}' (it has {', '.join(names)}); the model "
                    f"reads {', '.join(p for _, p, _ in self.profile_fields)}"
                )
            if sizes[pname] != size:
                raise UseripError(
                    f"bank {self.bank_location}: profile '{pname}' has codebook size {sizes[pname]}, the model "
                    f"field {fname} was trained with {size}"
                )
            cols.append(names.index(pname))
        return np.asarray(cols, dtype=np.int64)

    def _maybe_recheck_bank(self) -> None:
        """A long-running server picks up bank rebuilds; at most once a second, check they still fit."""
        now = time.monotonic()
        if now - self._bank_checked < BANK_CHECK_S:
            return
        with self._check_lock:
            if now - self._bank_checked < BANK_CHECK_S:
                return
            try:
                meta = self.bank.meta()
                from userip.bank import check_compatible

                check_compatible(meta, self.fingerprint)
                self._check_bank(meta)
                self._bank_cols = self._bank_columns(meta)
            except UseripError as e:
                raise Unavailable(f"the feature bank no longer fits the model: {e}") from None
            self._bank_checked = now

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
        self._maybe_recheck_bank()
        got = np.asarray(self.bank.get(list(user_ids)), dtype=np.int64)
        cols = self._bank_cols
        if got.ndim != 2 or got.shape[1] <= int(cols.max()):
            raise Unavailable(f"the feature bank returned shape {got.shape}; it changed under the server")
        return got[:, cols]

    def inputs(self, users: np.ndarray, profile_ids: np.ndarray, items: np.ndarray) -> dict[str, torch.Tensor]:
        """Model inputs for rows (user_idx, bank IDs, item_idx); arrays of length n, IDs [n, m]."""
        u = torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64))
        it = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64))
        prof = torch.from_numpy(np.ascontiguousarray(profile_ids, dtype=np.int64))
        out: dict[str, torch.Tensor] = {}
        j = 0
        for name, kind, table in self._plan:
            if kind == "user":
                out[name] = u
            elif kind == "item":
                out[name] = it
            elif kind == "genres":
                out[name] = table[it]
            elif kind == "history":
                out[name] = table[u]
            elif kind == "side":
                out[name] = torch.from_numpy(table[users])
            else:  # profile
                out[name] = prof[:, j]
                j += 1
        return out

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
            "bank": {"location": self.bank_location, "meta": self.bank.meta()},
            "explanations": str(self.explanations_path) if self.explanations_path else None,
        }

    def close(self) -> None:
        if self._own_bank and getattr(self, "bank", None) is not None:
            self.bank.close()
