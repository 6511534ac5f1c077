"""Pooled history states: the frozen LLM's hidden state, pooled over each behaviour window of a user.

The state is the last layer's, or a middle block's (``profile.pool_layer``): a middle layer is cheaper (the
blocks after it are not run) and is often as good a summary of what was read as the last, which is tuned to
predict the next token.

One no-grad forward per window (``[BOS] + window tokens``, no prompt), pooled by the mean over the window's
tokens, at its last token, or by the mean over its rating tokens (``rating``: 'rated' text, where the state
after reading "Title: 4" holds the reaction; mean-pooled states are dominated by which titles were watched,
so a user's rating habit sits in a direction a low-rank map finds slowly).

The amortised profile encoder reads these; the CTR history baselines reuse them (one module owns them).
Computing them is the expensive part, so they are cached on disk, content-addressed: a user's entry is keyed
by a digest of the LLM's identity, the pooling, and the user's window token ids, so a change of data, text
rendering or model recomputes exactly the users it touches, and nothing stale is read.

``item``: each interaction of a window ("Title: 4") is read on its own, without the items around it, and a
window's state is the mean over its items of their mean-pooled states. An interaction's state is then the
same for every user who had it, so each distinct one is read once per call however many users share it: on
ML-100K the 80.8k train interactions are 6.2k distinct (title, rating) pairs of ~7 tokens, a seventeenth of
the tokens the windows take, and a batch of new users costs a forward over only the distinct interactions in
it. What is lost is what an item's state takes from its neighbours in the window.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from userip.data.text import SEP
from userip.errors import UseripError
from userip.io import atomic_path
from userip.paths import cache_dir
from userip.profile.template import encode_behaviour, make_batch

log = logging.getLogger(__name__)


def model_key(llm, pool: str, layer: int = 0) -> str:
    """Identity of the LLM (name, size, a checksum of its input embeddings), the pooling and the layer."""
    emb = llm.input_embeddings().weight
    probe = emb.detach().flatten()[:4096].float().double().sum().item()
    raw = f"{llm.name}|{emb.shape[0]}x{emb.shape[1]}|{probe:.10e}|{pool}" + (f"|layer{layer}" if layer else "")
    return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()


def user_digest(windows: list[list[int]]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for w in windows:
        h.update(np.asarray(w, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.digest()


def digest_tensor(keys: list[bytes]) -> torch.Tensor:
    """[N, 16] uint8: 16-byte content digests as stored in a state cache file."""
    return torch.tensor(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16).copy())


@contextmanager
def first_blocks(llm, layer: int) -> Iterator[None]:
    """Run only the backbone's first ``layer`` decoder blocks (0: all of them) inside the block. The forward's
    last_hidden_state is then block ``layer``'s output through the model's final norm, and the blocks after it
    cost nothing: the point of pooling a middle layer."""
    backbone = llm.model.model
    blocks = backbone.layers
    if not layer:
        yield
        return
    if not 0 < layer <= len(blocks):
        raise UseripError(f"profile.pool_layer {layer}: {llm.name} has {len(blocks)} decoder blocks "
                          f"(use 1..{len(blocks)}, or 0 for the last)")
    backbone.layers = torch.nn.ModuleList(list(blocks)[:layer])
    try:
        yield
    finally:
        backbone.layers = blocks


@torch.no_grad()
def pool_windows(llm, windows: list[list[int]], pool: str = "mean", batch_size: int = 32,
                 progress: bool = False, marks: list[list[bool]] | None = None, layer: int = 0) -> torch.Tensor:
    """[N, H] fp32 pooled hidden states of ``windows`` (token id lists), batched by length: the last layer's,
    or block ``layer``'s (through the final norm; later blocks are not run). ``pool: rating`` averages over the
    tokens ``marks`` flags (a window with none falls back to the mean); ``pool: item`` reads each of a window's
    interactions on its own (see the module docstring)."""
    if pool == "rating" and (marks is None or len(marks) != len(windows)):
        raise ValueError("pool 'rating' needs the rating-token marks of every window ('rated' behaviour text)")
    if pool == "item":
        return _pool_items(llm, windows, batch_size, progress, layer)
    # eager attention, as the LLM is loaded on CPU: SDPA was slower here with the padding mask (536 vs 482 ms
    # per user, 100 users' windows, 2-core EPYC; bench/profile_infer.py --pool-layers)
    with first_blocks(llm, layer):
        return _pool(llm, windows, pool, batch_size, progress, marks)


def window_items(tokenizer, window: list[int]) -> list[list[int]]:
    """The token ids of each interaction of a behaviour window, as each tokenises on its own (the window's
    text split at the item separator); the whole window when it does not split."""
    pieces = [p for p in tokenizer.decode(window).split(SEP.strip()) if p.strip()]
    items = [encode_behaviour(tokenizer, p, len(window)) for p in pieces]
    return [t for t in items if t] or [list(window)]


def _pool_items(llm, windows: list[list[int]], batch_size: int, progress: bool, layer: int) -> torch.Tensor:
    """``pool: item``: every distinct interaction read once, on its own; a window is the mean of its items."""
    items = [window_items(llm.tokenizer, w) for w in windows]
    index: dict[tuple[int, ...], int] = {}
    for ws in items:
        for t in ws:
            index.setdefault(tuple(t), len(index))
    # an item is ~6 tokens, a window ~90: more rows per forward for the same work per batch
    with first_blocks(llm, layer):
        states = _pool(llm, [list(t) for t in index], "mean", batch_size * 8, progress, None)
    out = torch.zeros(len(windows), llm.hidden_size)
    for i, ws in enumerate(items):
        out[i] = states[[index[tuple(t)] for t in ws]].mean(0)
    return out


def _pool(llm, windows: list[list[int]], pool: str, batch_size: int, progress: bool,
          marks: list[list[bool]] | None) -> torch.Tensor:
    H = llm.hidden_size
    out = torch.zeros(len(windows), H)
    if not windows:
        return out
    bos = [int(llm.tokenizer.bos_token_id)] if llm.tokenizer.bos_token_id is not None else []
    order = np.argsort([len(w) for w in windows], kind="stable")
    backbone = llm.model.model
    bar = tqdm(range(0, len(order), batch_size), desc="pooling history states", disable=not progress,
               leave=False)
    for s in bar:
        idx = order[s : s + batch_size]
        seqs = [bos + list(windows[i]) for i in idx]
        batch = make_batch(seqs)  # right-padded ids and lengths
        ids, lengths = batch.behaviour, batch.lengths
        pos = torch.arange(ids.shape[1])[None]
        attn = (pos < lengths[:, None]).long()
        h = backbone(input_ids=ids.to(llm.device), attention_mask=attn.to(llm.device),
                     use_cache=False).last_hidden_state
        h = h.float().cpu()
        if pool == "last":
            pooled = h[torch.arange(len(seqs)), lengths - 1]
        else:  # mean over the window's own tokens (BOS excluded), or over its rating tokens
            keep = ((pos >= len(bos)) & (pos < lengths[:, None])).float()
            if pool == "rating":
                flag = torch.zeros_like(keep)
                for r, i in enumerate(idx):
                    m = torch.tensor(marks[i][: len(windows[i])], dtype=torch.float32)
                    flag[r, len(bos) : len(bos) + len(m)] = m
                keep = torch.where(flag.sum(1, keepdim=True) > 0, flag, keep)
            pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        out[torch.as_tensor(idx)] = pooled
    return out


class PooledStates:
    """Per user_idx, the pooled states [n_windows, H] of their train windows, from the disk cache where the
    same user content was pooled before with the same LLM and pooling."""

    def __init__(self, llm, pool: str = "mean", batch_size: int = 32, cache: Path | str | None = "default",
                 layer: int = 0) -> None:
        self.llm, self.pool, self.batch_size, self.layer = llm, pool, batch_size, layer
        self.key = model_key(llm, pool, layer)
        if cache == "default":
            cache = cache_dir("pooled") / f"{self.key}.safetensors"
        self.path = Path(cache) if cache is not None else None

    def _load(self) -> dict[bytes, torch.Tensor]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            t = load_file(str(self.path))
        except Exception as e:  # a corrupt cache is recomputed, never trusted
            log.warning("ignoring unreadable pooled-state cache %s (%s)", self.path, e)
            return {}
        digests, counts, states = t["digests"].numpy(), t["counts"].tolist(), t["states"]
        offs = np.r_[0, np.cumsum(counts)]
        return {digests[i].tobytes(): states[offs[i] : offs[i + 1]] for i in range(len(counts))}

    def _save(self, entries: dict[bytes, torch.Tensor]) -> None:
        if self.path is None or not entries:
            return
        keys = sorted(entries)
        tensors = {
            "digests": digest_tensor(keys),
            "counts": torch.tensor([len(entries[k]) for k in keys], dtype=torch.int64),
            "states": torch.cat([entries[k] for k in keys]).contiguous(),
        }
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata={"key": self.key, "pool": self.pool, "layer": str(self.layer)})

    def get(self, windows: dict[int, list[list[int]]], progress: bool = False,
            marks: dict[int, list[list[bool]]] | None = None) -> dict[int, torch.Tensor]:
        """States for every user of ``windows``; pools (and caches) only users whose content is new. ``marks``
        (per user, per window) are needed by ``pool: rating``; they follow from the tokens, so the key holds."""
        cached = self._load()
        digest = {u: user_digest(w) for u, w in windows.items()}
        todo = [u for u in sorted(windows) if digest[u] not in cached]
        if todo:
            flat = [w for u in todo for w in windows[u]]
            flat_marks = [m for u in todo for m in marks[u]] if (marks and self.pool == "rating") else None
            log.info("pooling %d windows of %d users (%d users cached)", len(flat), len(todo), len(windows) - len(todo))
            states = pool_windows(self.llm, flat, self.pool, self.batch_size, progress, marks=flat_marks,
                                  layer=self.layer)
            i = 0
            for u in todo:
                n = len(windows[u])
                cached[digest[u]] = states[i : i + n].clone()
                i += n
            self._save(cached)
        return {u: cached[digest[u]] for u in windows}

    @classmethod
    def forget(cls, windows_by_user: dict[int, list[list[int]]], cache: Path | str | None = None) -> int:
        """Remove the cached states of these users' windows (a user deleted on request): every entry whose
        content digest is one of theirs, in ``cache`` (one cache file) or in every file of the pooled-state
        cache (the digest does not depend on the model, so any model's entry for the same tokens goes).
        Returns how many entries were removed; a later fit that needs them pools them again."""
        from safetensors import safe_open

        digests = {user_digest(w) for w in windows_by_user.values()}
        files = [Path(cache)] if cache is not None else sorted(cache_dir("pooled").glob("*.safetensors"))
        removed = 0
        for path in files:
            if not path.is_file():
                continue
            try:
                t = load_file(str(path))
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
            except Exception as e:  # an unreadable cache file is never read either (see _load); say so
                log.warning("could not check pooled-state cache %s for deleted users (%s)", path, e)
                continue
            rows = t["digests"].numpy()
            keep = [i for i in range(len(rows)) if rows[i].tobytes() not in digests]
            if len(keep) == len(rows):
                continue
            removed += len(rows) - len(keep)
            if not keep:
                path.unlink()  # userip's own cache file, now empty
                continue
            offs = np.r_[0, np.cumsum(t["counts"].tolist())]
            tensors = {
                "digests": t["digests"][keep].contiguous(),  # still sorted: a subset of sorted rows
                "counts": t["counts"][keep].contiguous(),
                "states": torch.cat([t["states"][offs[i] : offs[i + 1]] for i in keep]).contiguous(),
            }
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
        return removed
