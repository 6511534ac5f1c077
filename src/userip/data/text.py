"""Behaviour text: a user's interactions rendered as the windows of text the LLM reads when fitting profiles.

Modes: ``sequence`` (titles in time order), ``rated`` ("Title: 4", the user's reaction beside each item, where
the data has ratings; a 0/1 label otherwise) and ``review`` (the interaction's text). ``title_year="drop"``
removes a trailing "(1995)": years are ~6 of ~11 tokens per MovieLens title and almost fully predictable from
the title, so they dilute the per-token signal.

Why rendering the user's ratings is not leakage: only train-split interactions are ever rendered for fitting,
and the CTR model trains on exactly those labels too (they are its training targets); validation-period windows
are rendered only to evaluate profiles and select a configuration; the test split is never rendered. A profile
therefore carries nothing about a test label that the CTR model's own training rows do not already hold. And
every item is rendered, liked or not: the behaviour sequence itself (what the user chose) is modelled, with
the reaction beside it, which keeps the windows a deterministic function of the split.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from userip.data.prepared import PreparedData
from userip.data.split import SPLITS, user_runs
from userip.errors import UseripError

SEP = "; "
MODES = ("sequence", "rated", "review")
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


def strip_year(title: str) -> str:
    """'Heat (1995)' -> 'Heat' (only a trailing four-digit year in parentheses)."""
    return _YEAR.sub("", title)


def format_reaction(rating: float, label: int) -> str:
    """The user's reaction as text: the rating ('4', '3.5'), or the 0/1 label where there is no rating."""
    if rating == rating:  # not NaN
        return f"{rating:g}"
    return str(int(label))


def by_user(data: PreparedData, split: str | Sequence[str]) -> tuple[pd.DataFrame, list[tuple[int, int, int]]]:
    """The interactions of ``split`` (a name, several, or "all"), still sorted by user then time, and
    ``(user_idx, start, end)`` of each user's rows among them. Users without any interaction there are absent."""
    names = list(SPLITS) if split == "all" else [split] if isinstance(split, str) else list(split)
    bad = [s for s in names if s not in SPLITS]
    if bad:
        raise UseripError(f"unknown split '{bad[0]}'; expected one of {', '.join(SPLITS)} or 'all'")
    inter = data.interactions
    rows = inter[inter["split"].isin(names)]
    users = rows["user_idx"].to_numpy()
    starts, ends = user_runs(users)
    return rows, [(int(users[s]), s, e) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def user_histories(data: PreparedData, split: str | Sequence[str] = "train") -> dict[int, np.ndarray]:
    """user_idx -> item_idx of that split in time order (ties by original row order). Users without any
    interaction in the split are absent."""
    rows, spans = by_user(data, split)
    items = rows["item_idx"].to_numpy(dtype=np.int64)
    return {u: items[s:e] for u, s, e in spans}


def token_counter(tokenizer: Any | None) -> Callable[[str], int]:
    """Number of tokens of a string: the tokenizer's ``encode`` (no special tokens) or ``__call__``;
    without a tokenizer, whitespace-separated words."""
    if tokenizer is None:
        return lambda s: len(s.split())
    return lambda s: len(_encode(tokenizer, s))


def _encode(tokenizer: Any, s: str) -> list:
    enc = getattr(tokenizer, "encode", None)
    if enc is not None:
        try:
            return list(enc(s, add_special_tokens=False))
        except TypeError:
            return list(enc(s))
    out = tokenizer(s)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def truncate_tokens(text: str, max_tokens: int, tokenizer: Any | None = None) -> str:
    """First ``max_tokens`` tokens of ``text`` (decoded back with the tokenizer when it can decode)."""
    if tokenizer is not None:
        ids = _encode(tokenizer, text)
        if len(ids) <= max_tokens:
            return text
        dec = getattr(tokenizer, "decode", None)
        if dec is not None:
            try:
                return str(dec(ids[:max_tokens], skip_special_tokens=True))
            except TypeError:
                return str(dec(ids[:max_tokens]))
    words = text.split()
    return text if len(words) <= max_tokens else " ".join(words[:max_tokens])


def pack_windows(
    titles: Sequence[str],
    *,
    max_items: int,
    max_tokens: int | None = None,
    tokenizer: Any | None = None,
    count: Callable[[str], int] | None = None,
) -> list[str]:
    """Greedily pack titles, in order, into "A; B; C" windows of at most ``max_items`` titles and (when
    ``max_tokens`` is set) at most ``max_tokens`` tokens. A title is never cut: when it does not fit, a new
    window starts; a single title longer than ``max_tokens`` forms a window of its own. ``count`` overrides
    the token counter (e.g. a memoised one shared across users)."""
    n = len(titles)
    if max_tokens is None:
        return [SEP.join(titles[i : i + max_items]) for i in range(0, n, max_items)]
    count = count or token_counter(tokenizer)
    first = [count(t) for t in titles]
    nxt = [count(SEP.strip() + " " + t) for t in titles]  # estimate of the title's cost after a separator
    out, i = [], 0
    while i < n:
        j, est = i + 1, first[i]
        while j < n and j - i < max_items and est + nxt[j] <= max_tokens:
            est += nxt[j]
            j += 1
        # The estimate is only a guide (tokens can merge across the separator): fix it with exact counts.
        while j - i > 1 and count(SEP.join(titles[i:j])) > max_tokens:
            j -= 1
        while j < n and j - i < max_items and count(SEP.join(titles[i : j + 1])) <= max_tokens:
            j += 1
        out.append(SEP.join(titles[i:j]))
        i = j
    return out


def behaviour_windows(
    data: PreparedData,
    split: str | Sequence[str] = "train",
    *,
    max_items: int = 16,
    tokenizer: Any | None = None,
    max_tokens: int | None = None,
    mode: str = "sequence",
    title_year: str = "keep",
) -> dict[int, list[str]]:
    """Per user_idx, that split's behaviour as text windows, in time order.

    ``mode="sequence"``: item titles joined by "; " ("Toy Story (1995); Heat (1995); ..."), at most
    ``max_items`` per window and, with ``max_tokens``, at most that many tokens (counted with ``tokenizer``,
    else whitespace words); long histories give several windows, every item appears exactly once.
    All items are rendered, liked or not: the behaviour sequence itself is modelled, which keeps the windows a
    deterministic function of the split.
    ``mode="rated"``: as ``sequence``, each title followed by the user's reaction ("Heat: 4; Toy Story: 5").
    ``title_year="drop"`` removes a trailing "(1995)" from titles (sequence and rated).
    ``mode="review"``: one window per interaction with text (the interaction's ``text`` column, else the
    item's), truncated to ``max_tokens``. An error if the data has no text column.
    Users without interactions in the split are absent.
    """
    if not isinstance(max_items, int) or max_items < 1:
        raise UseripError(f"max_items must be an integer >= 1, got {max_items!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise UseripError(f"max_tokens must be an integer >= 1 or None, got {max_tokens!r}")
    if mode not in MODES:
        raise UseripError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if title_year not in ("keep", "drop"):
        raise UseripError(f"title_year must be 'keep' or 'drop', got {title_year!r}")
    rows, spans = by_user(data, split)
    if not spans:
        return {}
    items = rows["item_idx"].to_numpy(dtype=np.int64)

    if mode in ("sequence", "rated"):
        pieces = _item_pieces(data, rows, mode, title_year)
        count = functools.lru_cache(maxsize=65536)(token_counter(tokenizer))  # titles repeat across users
        return {
            u: pack_windows(list(pieces[s:e]), max_items=max_items, max_tokens=max_tokens, count=count)
            for u, s, e in spans
        }

    if "text" in rows.columns:
        texts = rows["text"].to_numpy(dtype=object)
    elif "text" in data.items.columns:
        lut = np.array([None] * (data.n_items + 1), dtype=object)
        lut[data.items["item_idx"].to_numpy()] = data.items["text"].to_numpy(dtype=object)
        texts = lut[items]
    else:
        raise UseripError(
            "mode='review' needs text, but this dataset has no text column; prepare it with "
            "columns.interactions.text (e.g. review text) or columns.items.text in the config"
        )
    out: dict[int, list[str]] = {}
    for u, s, e in spans:
        win = []
        for t in texts[s:e]:
            if t is None or (isinstance(t, float) and np.isnan(t)) or not str(t).strip():
                continue
            t = " ".join(str(t).split())
            win.append(truncate_tokens(t, max_tokens, tokenizer) if max_tokens is not None else t)
        if win:
            out[u] = win
    return out


def _item_pieces(data: PreparedData, rows: pd.DataFrame, mode: str, title_year: str) -> np.ndarray:
    """One rendered piece per interaction row: its title ('sequence') or 'title: reaction' ('rated')."""
    titles = np.array([""] * (data.n_items + 1), dtype=object)
    raw = data.items["title"].to_numpy(dtype=object)
    if title_year == "drop":
        raw = np.array([strip_year(str(t)) for t in raw], dtype=object)
    titles[data.items["item_idx"].to_numpy()] = raw
    pieces = titles[rows["item_idx"].to_numpy(dtype=np.int64)]
    if mode == "rated":
        ratings = rows["rating"].to_numpy(dtype=np.float64)
        labels = rows["label"].to_numpy()
        reactions = [format_reaction(r, lab) for r, lab in zip(ratings, labels, strict=True)]
        pieces = np.array([f"{t}: {r}" for t, r in zip(pieces, reactions, strict=True)], dtype=object)
    return pieces


def recent_history(
    data: PreparedData,
    n_items: int,
    split: str | Sequence[str] = "train",
    *,
    mode: str = "sequence",
    title_year: str = "keep",
) -> dict[int, str]:
    """Per user_idx, the last ``n_items`` interactions of ``split`` rendered as one "A; B; C" string (the
    in-context history of the profile ceiling). ``review`` mode renders titles (reviews are too long)."""
    rows, spans = by_user(data, split)
    pieces = _item_pieces(data, rows, "rated" if mode == "rated" else "sequence", title_year)
    return {u: SEP.join(pieces[max(s, e - n_items) : e]) for u, s, e in spans}
