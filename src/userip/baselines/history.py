"""History-state baseline: the frozen LLM reads the user's train history; its hidden state is the feature.

The cheapest honest alternative to inferring soft profiles: no generation, no training. It reads exactly what
the amortised profile encoder reads: the profiles' own train behaviour windows (``build_corpus``, the same
rendering, token budget and ``history_windows`` cap), each pooled by the frozen LLM as the profile config says
(``PooledStates``, the one module that owns and caches these states, so a run whose profiles were fitted
already pays nothing here), averaged over the user's windows and standardised over users (the encoder's
``z_u``). ``+hist-dense`` is that vector; ``+hist-ids`` its k-means codes with the profiles' cardinalities.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from userip.baselines.features import (
    BaselineFeatures,
    as_prepared,
    check_cardinalities,
    describe_behaviour,
    quantized_features,
)
from userip.errors import UseripError

NAME = "history"


def _profile_config(profile: Any):
    from userip.profile.config import ProfileConfig

    if isinstance(profile, ProfileConfig):
        return profile
    if profile is None or isinstance(profile, Mapping):
        return ProfileConfig.from_dict(dict(profile or {}))
    raise UseripError(f"profile config: expected a ProfileConfig or a mapping, got {type(profile).__name__}")


def history_states(data, llm, profile=None, *, cache: str | Path | None = "default",
                   progress: bool = False) -> tuple[np.ndarray, torch.Tensor, dict[str, Any]]:
    """(users, z [n, H], what was read): each user's pooled train-window states averaged and standardised.

    ``profile``: the profiles' ``ProfileConfig`` (or its dict); it decides the rendering and the pooling.
    """
    from userip.profile.api import build_corpus
    from userip.profile.pooled import PooledStates

    cfg = _profile_config(profile).replace(max_users=0)  # every user: the CTR table covers them all
    corpus = build_corpus(data, llm.tokenizer, cfg)
    if not corpus.train:
        raise UseripError("no user has train behaviour windows: nothing for the LLM to read")
    cap = cfg.history_windows
    windows = {u: (w[-cap:] if cap else w) for u, w in corpus.train.items()}
    marks = {u: (m[-cap:] if cap else m) for u, m in corpus.train_marks.items()}
    if cfg.pool == "rating" and not marks:
        raise UseripError("profile.pool 'rating' needs behaviour: rated (the text must hold the ratings)")
    pooled = PooledStates(llm, cfg.pool, cfg.pool_batch, cache=cache, layer=cfg.pool_layer)
    states = pooled.get(windows, progress=progress, marks=marks or None)
    users = np.asarray(sorted(states), dtype=np.int64)
    means = torch.stack([states[int(u)].float().mean(0) for u in users])
    # the amortised encoder's z_u: centred and scaled per dimension, so no direction dominates by its scale
    std = means.std(0).clamp(min=1e-6) if len(means) > 1 else torch.ones(means.shape[1])
    z = (means - means.mean(0)) / std
    n_windows = sum(len(w) for w in windows.values())
    reads = (f"{describe_behaviour(cfg.to_dict(), 'every train window')} (<= {cfg.max_tokens} tokens"
             f"{f', the last {cap} windows' if cap else ''}) -> the frozen {llm.name}'s "
             f"{f'block {cfg.pool_layer}' if cfg.pool_layer else 'last'} hidden state, "
             f"{cfg.pool}-pooled per window, averaged, standardised")
    info = {"behaviour": cfg.behaviour, "title_year": cfg.title_year, "pool": cfg.pool, "max_tokens": cfg.max_tokens,
            "pool_layer": cfg.pool_layer, "history_windows": cap, "n_windows": n_windows, "reads": reads}
    return users, z, info


def history_baseline(data, llm, cardinalities: Mapping[str, int], profile=None, *, seed: int = 0,
                     cache: str | Path | None = "default", progress: bool = False) -> BaselineFeatures:
    """``+hist-dense`` (the standardised pooled history state, ``[n_users+1, H]``) and ``+hist-ids`` (its
    k-means codes, one column per profile name with the profiles' codebook sizes).

    ``data``: a PreparedData (or its directory); ``llm``: the profiles' frozen LLM; ``profile``: their
    ``ProfileConfig`` (or dict; default: the default config); ``cache``: the pooled-state cache
    (``"default"``: userip's, shared with the profile fit; None: no cache).
    """
    t_start = time.perf_counter()
    data = as_prepared(data)
    cards = check_cardinalities(cardinalities)
    users, z, info = history_states(data, llm, profile, cache=cache, progress=progress)
    meta = {**info, "model": llm.name, "pool_seconds": time.perf_counter() - t_start}
    return quantized_features(NAME, data, users, z.numpy(), cards, seed=seed, started=t_start, meta=meta)
