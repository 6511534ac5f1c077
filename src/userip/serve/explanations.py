"""What a served profile ID means: the run's ``explanations.json`` (from ``userip explain``), per profile and
code: nearest words, a decoded phrase, over-represented genres and titles. Optional: a server without it still
answers, with empty explanations."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from userip.errors import UseripError
from userip.io import sha256_file
from userip.serve.locate import read_json

log = logging.getLogger("userip.serve")


@dataclass
class CodeExplanation:
    words: list[str] = field(default_factory=list)
    phrase: str | None = None
    genres: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)


def explanations_for(
    explicit: str | os.PathLike | None, bank: object, ctr_dir: Path, train_meta: dict, bank_meta: dict[str, Any]
) -> tuple[Path | None, dict[str, dict[int, CodeExplanation]]]:
    """The explanations to serve: ``explicit`` (which must exist) or the run's (``find_explanations``); the
    path is None when there are none usable."""
    path = Path(explicit) if explicit is not None else find_explanations(bank, ctr_dir, train_meta)
    if explicit is not None and not path.is_file():
        raise UseripError(f"{path}: explanations file not found")
    explanations, why = load_explanations(path, bank_meta)
    return (None if why is not None else path), explanations


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
        raw = read_json(Path(path))
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
