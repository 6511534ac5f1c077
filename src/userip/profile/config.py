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
# `rated` behaviour puts the user's reaction after each title: the template says what the number is.
RATED_TEMPLATE = (
    "The user's hobby is {hobby}. The user's background is {background}. "
    "The user watched these movies and rated each from 1 to 5: {behaviour}"
)
INFERENCE_MODES = ("em", "amortised", "hybrid")


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
    template: str | None = None  # None: DEFAULT_TEMPLATE, or RATED_TEMPLATE for `rated` behaviour
    # em: per-user E-step (the paper) | amortised: a shared map from the frozen LLM's pooled history states |
    # hybrid: amortised, then the E-step refines each user's residual under a prior centred on the map's output
    inference: str = "em"
    mode: str = "em"  # em (default) | joint (reference code: LM loss + VQ loss by gradient)
    table: str = "residual"  # residual: shared[k] + delta[u, k] | plain: one free table per user (reference)
    init: str = "text"  # text: frozen embedding of the profile name (PEFT TEXT init) | uniform: U(-0.1, 0.1)
    delta_init_std: float = 1e-3
    mask: str = "profile"  # profile: profile-aware causal mask (paper) | causal
    behaviour: str = "sequence"  # sequence (paper: titles) | rated ("Title: 4") | review (reference code)
    title_year: str = "keep"  # keep | drop a trailing "(1995)" (years: ~6 of ~11 tokens, predictable)
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
    # k-means++ draws when a codebook is clustered from scratch (each run to convergence, the lowest inertia
    # kept): em's first M-step, and every M-step of amortised/hybrid, whose codes follow the map
    kmeans_restarts: int = 10
    joint_beta: float = 0.5  # joint mode: weight of ||sg(theta) - c||^2
    # amortised inference: theta_k = shared_k + A_k B_k z_u, z_u = standardised pooled history state
    rank: int = 32
    # amortised: the map reads the top-N principal components of z, whitened (0 = all hidden dims): the few
    # directions where users differ most, so the map cannot memorise detail of one user's windows
    pca: int = 0
    lr_map: float = 1e-3
    target: str = "loo"  # loo: a window the encoder did not read | forecast: the next window from earlier ones
    # per-window pooling of the LLM's last hidden state: mean | last (token) | rating (tokens) | item (each
    # interaction read on its own, a window the mean of its items: ~1/17 of the tokens; userip.profile.pooled)
    pool: str = "mean"
    # amortised: weight of the rating tokens in the training loss ('rated' text; 1 = every token alike). The
    # in-context ceiling's personal gain is almost all on rating tokens, while title tokens dominate the loss
    rating_weight: float = 1.0
    steps_per_epoch: int = 0  # 0 = one pass over the users
    history_windows: int = 0  # the encoder reads each user's last N train windows (0 = all)
    # amortised: train on the other users only, so evaluation measures how the map generalises to a user it
    # never saw (as for a new user) rather than what it memorised of a training user's own items
    unseen_eval_users: bool = False
    cross_fit: int = 0  # amortised: K >= 2 maps, each user's profile read by the map that never trained on them
    # hybrid: the first N epochs train the amortised map, the rest refine each user's residual by the E-step
    hybrid_map_epochs: int = 2
    # hybrid: weight of ||delta_u - amortised output_u||^2 in the E-step (per dim, as prior_lambda in em)
    hybrid_prior: float = 0.5
    pool_batch: int = 32  # windows per no-grad forward when pooling history states
    # which decoder block's output is pooled: 0 = the last; N = block N (later blocks are not run: a new user's
    # cost falls with N)
    pool_layer: int = 0
    # amortised: a cheap encoder for new users (userip.profile.student), distilled at the end of the fit: none |
    # item (each interaction read on its own, cached by content; a ridge regression to the encoder's input)
    student: str = "none"
    # evaluation / stopping
    eval_users: int = 0  # 0 = every user with validation windows
    eval_windows: int = 1  # held-out windows per evaluation user (the first ones of the validation period)
    # each epoch: select (the selection half, own/mean/scaled own: picks the best epoch; the full evaluation
    # runs once on the best) | full (every variant and the intervals every epoch)
    eval_each_epoch: str = "select"
    eval_scales: list[float] = field(default_factory=lambda: [0.5, 0.25])  # own, personal part scaled
    # publish the scale the selection half chose (at the best epoch): every user's personal part is shrunk (or
    # grown) toward the population centre by it in theta, the map and new users' profiles; IDs do not change
    # (codes read the normalised direction). The epoch is chosen by its best scaled own. False: publish x1
    apply_scale: bool = True
    ceiling_items: int = 24  # the in-context ceiling: the user's last N train interactions as plain text
    # the ceiling's plain-text prompt before the history (None: the template's text right before {behaviour});
    # set it when the slots sit inside that text, e.g. "... from 1 to 5 (hobby: {hobby}): {behaviour}"
    ceiling_lead_in: str | None = None
    bootstrap: int = 1000  # resamples of the evaluation users for 95% intervals
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
        if self.template is None:
            self.template = RATED_TEMPLATE if self.behaviour == "rated" else DEFAULT_TEMPLATE
        self.eval_scales = [float(a) for a in self.eval_scales]
        names = [p.name for p in self.profiles]
        if not names:
            raise UseripError("config.profiles: at least one profile is required")
        if len(set(names)) != len(names):
            raise UseripError(f"config.profiles: duplicate profile names {names}")
        choices = {"mode": ("em", "joint"), "table": ("residual", "plain"), "init": ("text", "uniform"),
                   "mask": ("profile", "causal"), "behaviour": ("sequence", "rated", "review"),
                   "title_year": ("keep", "drop"), "inference": INFERENCE_MODES, "target": ("loo", "forecast"),
                   "pool": ("mean", "last", "rating", "item"), "eval_each_epoch": ("select", "full"),
                   "student": ("none", "item")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UseripError(f"config.{key}: '{getattr(self, key)}' is not one of {', '.join(allowed)}")
        positive = ("max_items", "max_tokens", "windows_per_user", "batch_users", "inner_steps", "epochs",
                    "kmeans_iters", "ce_chunk", "rank", "pool_batch", "eval_windows", "ceiling_items",
                    "hybrid_map_epochs", "kmeans_restarts")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise UseripError(f"config.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("prior_lambda", "prior_beta", "lr_user", "lr_shared", "delta_init_std", "joint_beta", "lr_map",
                    "steps_per_epoch", "bootstrap", "history_windows", "cross_fit", "hybrid_prior", "pool_layer"):
            if float(getattr(self, key)) < 0:
                raise UseripError(f"config.{key}: must be >= 0, got {getattr(self, key)}")
        for name in names:
            if "{" + name + "}" not in self.template:
                raise UseripError(f"config.template: missing the slot {{{name}}} for profile '{name}'")
        if not self.template.rstrip().endswith("{behaviour}"):
            raise UseripError("config.template: must end with the {behaviour} slot")
        if self.inference in ("amortised", "hybrid") and (self.mode != "em" or self.table != "residual"):
            raise UseripError(f"config.inference: '{self.inference}' needs mode 'em' and table 'residual' (the map "
                              "gives the per-user residual)")
        if self.student != "none" and self.inference != "amortised":
            raise UseripError(f"config.student: '{self.student}' distils the amortised encoder; inference is "
                              f"'{self.inference}' (use inference: amortised, or student: none)")
        if self.inference == "hybrid" and self.hybrid_map_epochs >= self.epochs:
            raise UseripError(f"config.hybrid_map_epochs: {self.hybrid_map_epochs} leaves no E-step epoch of "
                              f"epochs {self.epochs}; set it below epochs")

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
        changes = {k: v for k, v in changes.items() if v is not None}
        if "behaviour" in changes and "template" not in changes and self.template in (DEFAULT_TEMPLATE, RATED_TEMPLATE):
            changes["template"] = None  # a default template follows the behaviour it was chosen for
        return dataclasses.replace(self, **changes)
