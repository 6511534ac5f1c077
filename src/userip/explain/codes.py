"""Read a PROFILES directory back and map each code to its vector in soft-token space.

A code's soft tokens are ``base + mu + s * c`` (see docs/internals.md): ``base`` is the shared prompt
(residual table) or the fitted users' mean theta (plain table), ``mu`` the centre and ``s`` the RMS spread
of the personal part, ``c`` the codeword (centred, L2-normalised personal space). The *population* value of
a profile, used for the other slots when one profile is explained, is ``base + mu``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file

from userip.errors import UseripError
from userip.io import check_format, read_yaml
from userip.profile.config import ProfileConfig
from userip.quantize import load_codebooks


@dataclass
class ProfileCodes:
    """Everything explanations need from a PROFILES dir, with code vectors already in soft-token space."""

    root: Path
    conf: dict[str, Any]  # config.yaml as written by the profile stage
    cfg: ProfileConfig
    ids: pd.DataFrame  # profile_ids.parquet: user_id, user_idx, one column per profile
    population: torch.Tensor  # [m, n, H] base + mu per profile
    code_vectors: dict[str, torch.Tensor]  # name -> [K, n_k, H]

    @property
    def names(self) -> list[str]:
        return self.cfg.names

    @property
    def hidden(self) -> int:
        return int(self.population.shape[-1])


def load_profile_codes(profiles_dir: str | Path) -> ProfileCodes:
    root = Path(profiles_dir)
    check_format(root, "profiles")  # a PROFILES dir of a newer format is named, not misread
    need = ("profiles.safetensors", "codebooks.safetensors", "profile_ids.parquet", "config.yaml")
    missing = [f for f in need if not (root / f).exists()]
    if missing:
        raise UseripError(f"{root}: not a PROFILES directory (missing {', '.join(missing)}); "
                          "run `userip profile fit` first")
    conf = read_yaml(root / "config.yaml") or {}
    cfg = ProfileConfig.from_dict(conf.get("profile") or {
        "template": conf.get("template"), "profiles": conf.get("profiles")})
    ids = pd.read_parquet(root / "profile_ids.parquet")
    t = load_file(str(root / "profiles.safetensors"))
    books = load_codebooks(root / "codebooks.safetensors")
    theta = t["theta"].float()
    users = torch.tensor(ids["user_idx"].to_numpy(dtype="int64"))
    if len(users) == 0:
        raise UseripError(f"{root}/profile_ids.parquet: no fitted users")
    # residual table: the shared prompt; plain table: the fitted users' mean theta
    base = t["shared"].float() if cfg.table == "residual" and "shared" in t else theta[users].mean(0)
    if "code_center" in t and "code_scale" in t:
        mu, scale = t["code_center"].float(), t["code_scale"].float()
    else:  # older outputs: recompute the centre and spread of the personal part
        personal = t["personal"].float()[users]
        mu = personal.mean(0)
        scale = torch.stack([(personal[:, k] - mu[k]).flatten(1).pow(2).sum(1).mean().sqrt()
                             for k in range(personal.shape[1])])
    population = base + mu
    vectors = {}
    H = theta.shape[-1]
    for k, p in enumerate(cfg.profiles):
        if p.name not in books:
            raise UseripError(f"{root}/codebooks.safetensors: no codebook for profile '{p.name}'")
        cb = books[p.name]
        if cb.shape[1] != p.n_tokens * H:
            raise UseripError(f"codebook '{p.name}': width {cb.shape[1]} != n_tokens*hidden {p.n_tokens * H}")
        c = cb.view(cb.shape[0], p.n_tokens, H)
        vectors[p.name] = population[k, : p.n_tokens][None] + scale[k] * c
    return ProfileCodes(root, conf, cfg, ids, population, vectors)
