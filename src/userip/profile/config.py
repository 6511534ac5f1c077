"""Profile-fitting configuration: plain data, validated on construction (PEFT-style config dataclass)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from userip.errors import UseripError

DEFAULT_TEMPLATE = (
    "The user's hobby is {hobby}. The user's background is {background}. The user watched: {behaviour}"
)


@dataclass
class ProfileSpec:
    """One profile type: its name (also the text-init phrase), soft tokens per user, codebook size."""

    name: str
    n_tokens: int = 1
    codebook_size: int = 4
    init_text: str | None = None  # defaults to the name

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name or ""):
            raise UseripError(f"profile name '{self.name}': expected an identifier (letters, digits, _)")
        if self.n_tokens < 1:
            raise UseripError(f"profile '{self.name}': n_tokens must be >= 1, got {self.n_tokens}")
        if self.codebook_size < 1:
            raise UseripError(f"profile '{self.name}': codebook_size must be >= 1, got {self.codebook_size}")


@dataclass
class ProfileConfig:
    """Everything that determines a profile fit. Saved to PROFILES/config.yaml and enough to reproduce it."""

    profiles: list[ProfileSpec] = field(
        default_factory=lambda: [ProfileSpec("hobby", 1, 4), ProfileSpec("background", 1, 3)]
    )
    template: str = DEFAULT_TEMPLATE
    mode: str = "em"  # em (default) | joint (reference code: LM loss + VQ loss by gradient)
    table: str = "residual"  # residual: shared[k] + delta[u, k] | plain: one free table per user (reference)
    init: str = "text"  # text: frozen embedding of the profile name (PEFT TEXT init) | uniform: U(-0.1, 0.1)
    delta_init_std: float = 1e-3
    mask: str = "profile"  # profile: profile-aware causal mask (paper) | causal
    behaviour: str = "sequence"  # sequence (paper: item-title windows) | review (reference code: review text)
    # behaviour windows
    max_items: int = 16
    max_tokens: int = 96
    windows_per_user: int = 4  # cap per epoch so heavy users do not dominate
    # E-step budget: each user batch takes `inner_steps` updates, one window per user per step
    batch_users: int = 32
    micro_batch: int = 16  # rows per forward/backward (gradient accumulation): bounds activation memory
    inner_steps: int = 4
    epochs: int = 3
    lr_user: float = 0.1
    lr_shared: float = 0.01
    # MAP prior on the residual: lambda * ||delta||^2 + beta * ||delta - sg(target code)||^2 (per dim)
    prior_lambda: float = 0.5
    prior_beta: float = 0.5
    # quantisation / M-step
    kmeans_iters: int = 5
    joint_beta: float = 0.5  # joint mode: weight of ||sg(theta) - c||^2
    # evaluation / stopping
    eval_users: int = 0  # 0 = every user with validation windows
    patience: int = 2
    # compute
    dtype: str = "auto"
    device: str = "cpu"
    threads: int = 0  # 0 = leave torch's default
    checkpointing: bool = False  # activation checkpointing through the LLM layers
    ce_chunk: int = 1024  # tokens per chunk of the LM-head + cross-entropy (bounds logits memory)
    seed: int = 0
    max_users: int = 0  # 0 = all users

    def __post_init__(self) -> None:
        self.profiles = [p if isinstance(p, ProfileSpec) else ProfileSpec(**p) for p in self.profiles]
        names = [p.name for p in self.profiles]
        if not names:
            raise UseripError("config.profiles: at least one profile is required")
        if len(set(names)) != len(names):
            raise UseripError(f"config.profiles: duplicate profile names {names}")
        choices = {"mode": ("em", "joint"), "table": ("residual", "plain"), "init": ("text", "uniform"),
                   "mask": ("profile", "causal"), "behaviour": ("sequence", "review")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UseripError(f"config.{key}: '{getattr(self, key)}' is not one of {', '.join(allowed)}")
        positive = ("max_items", "max_tokens", "windows_per_user", "batch_users", "inner_steps", "epochs",
                    "kmeans_iters", "ce_chunk")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise UseripError(f"config.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("prior_lambda", "prior_beta", "lr_user", "lr_shared", "delta_init_std", "joint_beta"):
            if float(getattr(self, key)) < 0:
                raise UseripError(f"config.{key}: must be >= 0, got {getattr(self, key)}")
        for name in names:
            if "{" + name + "}" not in self.template:
                raise UseripError(f"config.template: missing the slot {{{name}}} for profile '{name}'")
        if not self.template.rstrip().endswith("{behaviour}"):
            raise UseripError("config.template: must end with the {behaviour} slot")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.profiles]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ProfileConfig:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UseripError(f"profile config: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> ProfileConfig:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
