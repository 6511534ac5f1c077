"""The tokenised behaviour a fit reads: train windows, held-out windows and what evaluation needs of them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from userip.data.text import SEP
from userip.profile.template import encode_behaviour


@dataclass
class Corpus:
    """Tokenised behaviour windows: per user_idx, train windows and held-out (validation-period) windows.

    For evaluation it may also hold, per held-out window, its item count and which tokens are the user's
    rating ('rated' text), and per user the ceiling's in-context history (token ids of the last N train items).
    ``train_marks`` marks the rating tokens of train windows ('rated' text), for ``pool: rating``.
    """

    train: dict[int, list[list[int]]]
    heldout: dict[int, list[list[int]]]
    n_users: int  # largest user_idx (table has n_users + 1 rows)
    activity: np.ndarray  # [n_users + 1] train interactions per user
    heldout_items: dict[int, list[int]] = field(default_factory=dict)
    heldout_marks: dict[int, list[list[bool]]] = field(default_factory=dict)
    context: dict[int, list[int]] = field(default_factory=dict)
    train_marks: dict[int, list[list[bool]]] = field(default_factory=dict)

    @classmethod
    def from_text(cls, tokenizer, train: dict[int, list[str]], heldout: dict[int, list[str]], n_users: int,
                  activity: np.ndarray, max_tokens: int, *, context: dict[int, str] | None = None,
                  lead_in: str = "", rated: bool = False) -> Corpus:
        def enc(d: dict[int, list[str]]) -> dict[int, list[list[int]]]:
            out = {}
            for u, wins in d.items():
                toks = [encode_behaviour(tokenizer, w, max_tokens) for w in wins if w.strip()]
                toks = [t for t in toks if t]
                if toks:
                    out[int(u)] = toks
            return out

        corpus = cls(enc(train), enc(heldout), n_users, np.asarray(activity))
        if rated:  # the encoder may pool at the rating tokens of a user's train windows
            for u, wins in train.items():
                if int(u) in corpus.train:
                    corpus.train_marks[int(u)] = [rating_marks(tokenizer, w, max_tokens) for w in wins if w.strip()]
        for u, wins in heldout.items():
            if int(u) not in corpus.heldout:
                continue
            wins = [w for w in wins if w.strip()]
            corpus.heldout_items[int(u)] = [w.count(SEP) + 1 for w in wins]
            if rated:
                corpus.heldout_marks[int(u)] = [rating_marks(tokenizer, w, max_tokens) for w in wins]
        for u, text in (context or {}).items():
            corpus.context[int(u)] = encode_context(tokenizer, lead_in, text)
        return corpus


_RATING = re.compile(r": (\d+(?:\.\d+)?)(?=;|$)")


def rating_marks(tokenizer, text: str, max_tokens: int) -> list[bool]:
    """Which behaviour tokens of a 'rated' window spell a rating ("Heat: 4" -> the "4"), by character offsets;
    all False when the tokenizer gives no offsets."""
    text = " " + text.strip()
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return [False] * len(encode_behaviour(tokenizer, text, max_tokens))
    spans = [m.span(1) for m in _RATING.finditer(text)]
    marks, j = [], 0
    for a, b in offsets[:max_tokens]:
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        marks.append(j < len(spans) and a < spans[j][1] and b > spans[j][0])
    return marks


def encode_context(tokenizer, lead_in: str, history: str) -> list[int]:
    """Token ids of '<lead-in> <history>;' : the ceiling's plain-text history, which the held-out window's
    tokens then continue (a held-out window starts with a space, as after the template)."""
    text = (lead_in.strip() + " " + history.strip()).strip() + SEP.rstrip()
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
