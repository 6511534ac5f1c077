"""Text-profile baseline (KAR-style): the frozen LLM *writes* a profile from the user's behaviour.

This is the "behaviour -> profile text" direction that UserIP-Tuning argues against (the generated text is
free-form, hallucination-prone and costs a decoding pass per user). It is here so the CTR harness can
compare it with the fitted soft-prompt IDs on equal terms: the same LLM, the same train interactions,
and IDs of the same cardinalities (k-means on MiniLM embeddings of the generated text).

Generation is greedy, batched with left padding, and cached in a Parquet file keyed by user_idx, model
(name + weight fingerprint) and a hash of the exact rendered prompt and generation settings. The prompt
contains the titles themselves, so a cache hit is only possible for the same user history.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from userip.baselines.features import (
    BaselineFeatures,
    as_prepared,
    check_cardinalities,
    describe_behaviour,
    quantized_features,
)
from userip.errors import UseripError
from userip.io import atomic_path

log = logging.getLogger(__name__)

NAME = "text-profile"
DEFAULT_PROMPT = (
    "Here are movies a user watched: {items}. "
    "In one sentence, describe this user's tastes and background:"
)
# `rated` behaviour (as the profiles read it): the prompt says what the number after each title is
RATED_PROMPT = (
    "Here are movies a user watched, each followed by the user's rating from 1 to 5: {items}. "
    "In one sentence, describe this user's tastes and background:"
)
LABEL_PROMPT = (
    "Here are movies a user watched, each followed by 1 if the user liked it and 0 if not: {items}. "
    "In one sentence, describe this user's tastes and background:"
)
CACHE_FILE = "text_profiles.parquet"
CACHE_COLUMNS = ("user_idx", "model", "model_key", "prompt_hash", "text", "gen_seconds")
ITEM_SEP = "; "


# ---------------------------------------------------------------------------------------------- inputs
def train_titles(data, *, max_items: int = 30, users: Iterable[int] | None = None) -> dict[int, list[str]]:
    """user_idx -> titles of the user's last ``max_items`` *train* interactions, oldest first.

    Only the train split is read: val/test interactions never reach a baseline's features. Users without
    train interactions are absent; ``users`` (dense user_idx) restricts the result.
    """
    from userip.data import user_histories

    if not isinstance(max_items, int) or max_items < 1:
        raise UseripError(f"max_items must be an integer >= 1, got {max_items!r}")
    hist = user_histories(data, "train")
    titles = np.array([""] * (data.n_items + 1), dtype=object)
    titles[data.items["item_idx"].to_numpy()] = data.items["title"].to_numpy(dtype=object)
    keep = sorted(hist) if users is None else _check_users(data, users, hist)
    return {u: [str(t) for t in titles[hist[u][-max_items:]]] for u in keep}


def train_behaviour(data, *, max_items: int = 30, users: Iterable[int] | None = None, behaviour: str = "sequence",
                    title_year: str = "keep") -> dict[int, list[str]]:
    """user_idx -> the user's last ``max_items`` *train* interactions rendered as the profiles render them
    ('Heat: 4' for ``rated``, titles for ``sequence`` and ``review``: a review is too long for the prompt),
    oldest first. ``sequence`` with ``title_year: keep`` is exactly :func:`train_titles`."""
    from userip.baselines.features import rendered_behaviour

    if not isinstance(max_items, int) or max_items < 1:
        raise UseripError(f"max_items must be an integer >= 1, got {max_items!r}")
    pieces = rendered_behaviour(data, "sequence" if behaviour == "review" else behaviour, title_year)
    keep = sorted(pieces) if users is None else _check_users(data, users, pieces)
    return {u: list(pieces[u][-max_items:]) for u in keep}


def default_prompt(data, behaviour: str = "sequence") -> str:
    """The prompt for the rendering: rated text says what the number is (a rating, or a 0/1 label)."""
    if behaviour != "rated":
        return DEFAULT_PROMPT
    has_rating = "rating" in data.interactions and data.interactions["rating"].notna().all()
    return RATED_PROMPT if has_rating else LABEL_PROMPT


def _check_users(data, users: Iterable[int], hist: Mapping[int, np.ndarray]) -> list[int]:
    arr = np.unique(np.asarray(list(users), dtype=np.int64))
    bad = arr[(arr < 1) | (arr > data.n_users)]
    if len(bad):
        raise UseripError(f"users: user_idx {int(bad[0])} is out of range 1..{data.n_users}")
    no_hist = [int(u) for u in arr if int(u) not in hist]
    if no_hist:
        log.info("%d requested users have no train interactions and get no profile", len(no_hist))
    return [int(u) for u in arr if int(u) in hist]


def render_prompt(tokenizer: Any, titles: Sequence[str], template: str = DEFAULT_PROMPT) -> str:
    """The full prompt text: the instruction, wrapped in the tokenizer's chat template when it has one."""
    text = template.format(items=ITEM_SEP.join(titles))
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        ))
    return text


def model_key(llm) -> str:
    """``name@hash``: the name plus a fingerprint of config, dtype and a slice of the weights, so two
    different checkpoints sharing a name (e.g. tiny test models) never share cache entries."""
    h = hashlib.sha256()
    h.update(str(llm.name).encode())
    h.update(str(llm.dtype).encode())
    cfg = getattr(llm.model, "config", None)
    if cfg is not None:
        h.update(cfg.to_json_string(use_diff=False).encode())
    w = llm.model.get_input_embeddings().weight.detach()
    h.update(w.reshape(-1)[:8192].to(torch.float32).cpu().numpy().tobytes())
    h.update(str(tuple(w.shape)).encode())
    return f"{llm.name}@{h.hexdigest()[:16]}"


def prompt_hash(prompt: str, max_new_tokens: int) -> str:
    return hashlib.sha256(f"greedy|{max_new_tokens}|{prompt}".encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- generation
def generate(llm, prompts: Sequence[str], *, max_new_tokens: int = 40, batch_size: int = 16,
             chat: bool | None = None, on_batch=None) -> tuple[list[str], list[float]]:
    """Greedy completions of ``prompts`` -> (texts, seconds per prompt).

    Prompts are batched by length (left padding, so every row's new tokens start at the same column) and
    each prompt's time is its batch's wall time divided by the batch size. ``chat``: prompts already carry
    the chat markup (no extra special tokens); default: whether the tokenizer has a chat template.
    ``on_batch(indices, texts, seconds)`` is called after each batch (used to flush the cache).
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1:
        raise UseripError("max_new_tokens and batch_size must be >= 1")
    tok = llm.tokenizer
    chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    add_special = not chat
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    # Special tokens other than EOS never belong in a profile; min_new_tokens keeps it from being empty.
    suppress = sorted({int(i) for i in tok.all_special_ids} - {int(eos)}) if eos is not None else []
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=min(2, max_new_tokens), do_sample=False, num_beams=1,
        eos_token_id=eos, pad_token_id=pad, suppress_tokens=suppress or None,
    )
    lengths = [len(tok(p, add_special_tokens=add_special)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    texts: list[str] = [""] * len(prompts)
    seconds: list[float] = [0.0] * len(prompts)
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                      add_special_tokens=add_special).to(llm.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = llm.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                         generation_config=gen_cfg)
            dt = (time.perf_counter() - t0) / len(idx)
            new = out[:, enc["input_ids"].shape[1]:]
            batch_texts = [clean(t) for t in tok.batch_decode(new, skip_special_tokens=True)]
            for i, t in zip(idx, batch_texts, strict=True):
                texts[i], seconds[i] = t, dt
            if on_batch is not None:
                on_batch(idx, batch_texts, dt)
    finally:
        tok.padding_side = old_side
    return texts, seconds


def clean(text: str) -> str:
    """One line: control characters dropped, whitespace runs collapsed."""
    text = "".join(c for c in str(text) if c.isspace() or unicodedata.category(c) != "Cc")
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------- cache
class ProfileCache:
    """Generated texts in ``<dir>/text_profiles.parquet``; rewritten atomically on every flush."""

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self.path = Path(directory) / CACHE_FILE if directory is not None else None
        self.table = self._read()
        self._pending: list[dict[str, Any]] = []

    def _read(self) -> pd.DataFrame:
        if self.path is None or not self.path.is_file():
            return pd.DataFrame({c: pd.Series(dtype=object) for c in CACHE_COLUMNS})
        try:
            t = pd.read_parquet(self.path)
        except Exception as e:  # a cache is an optimisation: a broken one is regenerated, not fatal
            log.warning("ignoring unreadable text-profile cache %s (%s)", self.path, e)
            return pd.DataFrame({c: pd.Series(dtype=object) for c in CACHE_COLUMNS})
        if any(c not in t.columns for c in CACHE_COLUMNS):
            log.warning("ignoring text-profile cache %s with unexpected columns", self.path)
            return pd.DataFrame({c: pd.Series(dtype=object) for c in CACHE_COLUMNS})
        return t

    def lookup(self, mkey: str) -> dict[tuple[int, str], tuple[str, float]]:
        t = self.table[self.table["model_key"] == mkey]
        return {
            (int(u), str(h)): (str(x), float(s))
            for u, h, x, s in zip(t["user_idx"], t["prompt_hash"], t["text"], t["gen_seconds"], strict=True)
        }

    def add(self, rows: list[dict[str, Any]]) -> None:
        self._pending.extend(rows)
        self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        new = pd.DataFrame(self._pending, columns=list(CACHE_COLUMNS))
        self._pending = []
        frames = [f for f in (self.table, new) if len(f)]
        t = pd.concat(frames, ignore_index=True) if frames else new
        t = t.drop_duplicates(["user_idx", "model_key", "prompt_hash"], keep="last").reset_index(drop=True)
        t["user_idx"] = t["user_idx"].astype("int64")
        t["gen_seconds"] = t["gen_seconds"].astype("float64")
        self.table = t
        if self.path is None:
            return
        try:
            with atomic_path(self.path) as tmp:
                t.to_parquet(tmp, index=False)
        except OSError as e:
            log.warning("could not write the text-profile cache %s: %s", self.path, e)


def default_cache_dir() -> Path:
    from userip.paths import cache_dir

    return cache_dir("baselines")


# ---------------------------------------------------------------------------------------------- baseline
def generate_profiles(data, llm, *, max_items: int = 30, max_new_tokens: int = 40, batch_size: int = 16,
                      cache_dir: str | os.PathLike | None = None, users: Iterable[int] | None = None,
                      template: str | None = None, behaviour: str = "sequence",
                      title_year: str = "keep") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Text profile per user (cached) -> (table user_idx, user_id, text, gen_seconds, cached; stats).

    The prompt shows the user's last ``max_items`` train interactions rendered as the profiles render them
    (``behaviour``, ``title_year``); ``template`` defaults to the one for that rendering."""
    data = as_prepared(data)
    template = template or default_prompt(data, behaviour)
    hist = train_behaviour(data, max_items=max_items, users=users, behaviour=behaviour, title_year=title_year)
    if not hist:
        raise UseripError("no user has train interactions: nothing to profile")
    user_list = sorted(hist)
    prompts = [render_prompt(llm.tokenizer, hist[u], template) for u in user_list]
    hashes = [prompt_hash(p, max_new_tokens) for p in prompts]
    mkey = model_key(llm)
    cache = ProfileCache(cache_dir if cache_dir is not None else default_cache_dir())
    known = cache.lookup(mkey)
    texts: dict[int, str] = {}
    secs: dict[int, float] = {}
    cached: dict[int, bool] = {}
    todo = []
    for u, h in zip(user_list, hashes, strict=True):
        if (u, h) in known:
            texts[u], secs[u] = known[(u, h)]
            cached[u] = True
        else:
            todo.append(u)
    pos = {u: i for i, u in enumerate(user_list)}

    def flush(idx: list[int], batch_texts: list[str], dt: float) -> None:
        rows = []
        for j, t in zip(idx, batch_texts, strict=True):
            u = todo[j]
            rows.append({"user_idx": u, "model": llm.name, "model_key": mkey, "prompt_hash": hashes[pos[u]],
                         "text": t, "gen_seconds": dt})
        cache.add(rows)

    t0 = time.perf_counter()
    if todo:
        log.info("generating %d text profiles with %s (%d cached)", len(todo), llm.name, len(cached))
        out, sec = generate(llm, [prompts[pos[u]] for u in todo], max_new_tokens=max_new_tokens,
                            batch_size=batch_size, on_batch=flush)
        for u, t, s in zip(todo, out, sec, strict=True):
            texts[u], secs[u], cached[u] = t, s, False
    wall = time.perf_counter() - t0
    table = pd.DataFrame({
        "user_idx": np.asarray(user_list, dtype=np.int64),
        "user_id": data.user_ids(user_list),
        "text": [texts[u] for u in user_list],
        "gen_seconds": [secs[u] for u in user_list],
        "cached": [cached[u] for u in user_list],
    })
    stats = {
        "n_generated": len(todo),
        "n_cached": len(user_list) - len(todo),
        "generation_seconds_this_run": wall,
        "generation_seconds_per_user": float(table["gen_seconds"].mean()),
        "generation_seconds_total": float(table["gen_seconds"].sum()),
        "model": llm.name,
        "model_key": mkey,
        "model_dtype": str(llm.dtype).replace("torch.", ""),
        "template_hash": hashlib.sha256(template.encode()).hexdigest()[:16],
        "cache": str(cache.path) if cache.path else None,
    }
    return table, stats


def text_profile_baseline(
    data,
    llm,
    cardinalities: Mapping[str, int],
    *,
    max_items: int = 30,
    max_new_tokens: int = 40,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    users: Iterable[int] | None = None,
    seed: int = 0,
    template: str | None = None,
    behaviour: str = "sequence",
    title_year: str = "keep",
) -> BaselineFeatures:
    """KAR-style baseline: LLM-written profile per user -> MiniLM embedding (dense) + k-means IDs.

    ``data``: a PreparedData (or its directory); ``llm``: a ``userip.llm.LLM``; ``cardinalities``: profile
    name -> K, e.g. ``{"hobby": 4, "background": 3}``. Only the last ``max_items`` train interactions of each
    user are shown to the LLM, rendered as the profiles render them (``behaviour``, ``title_year``: pass the
    profiles' ``ProfileConfig`` values, so both read the same behaviour). ``users`` restricts to these dense
    user_idx (others get zero rows and no IDs). ``cache_dir`` defaults to userip's cache dir
    (``$USERIP_CACHE_DIR/baselines``).
    """
    from userip.baselines.encoder import ENCODER_NAME, encode

    t_start = time.perf_counter()
    data = as_prepared(data)
    cards = check_cardinalities(cardinalities)
    template = template or default_prompt(data, behaviour)
    table, stats = generate_profiles(data, llm, max_items=max_items, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, cache_dir=cache_dir, users=users, template=template,
                                     behaviour=behaviour, title_year=title_year)
    t0 = time.perf_counter()
    emb = encode(table["text"].tolist())
    meta_r = {"behaviour": behaviour, "title_year": title_year}
    meta = {
        **stats,
        "encoder": ENCODER_NAME,
        "max_items": max_items,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "template": template,
        "encode_seconds": time.perf_counter() - t0,
        "behaviour": behaviour,
        "title_year": title_year,
        "reads": f"{describe_behaviour(meta_r, f'the last {max_items} train interactions')} -> {stats['model']} "
                 f"writes a profile (<= {max_new_tokens} tokens) -> {ENCODER_NAME}",
    }
    return quantized_features(NAME, data, table["user_idx"].to_numpy(dtype=np.int64), emb, cards, seed=seed,
                              started=t_start, meta=meta, texts=table.drop(columns=["cached"]))
