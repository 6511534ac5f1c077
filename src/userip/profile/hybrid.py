"""Hybrid inference (issue 10, item 4): the paper's per-user EM, started where it can succeed.

    phase 1  (epochs 1 .. hybrid_map_epochs)      the amortised fit, unchanged (userip.profile.amortised): the
                                                 shared prompt and the history map, trained together
    phase 2  (the remaining epochs)               every user's residual starts at the amortised output
                                                 a_u = A B z_u of the best phase-1 epoch (selected on the selection
                                                 half, as every epoch is) and takes the em E-step
                                                 (``em.EStep``: ``inner_steps`` updates per user batch at
                                                 ``lr_user``, one window each, em's window sampling) against
                                                 behaviour NLL + hybrid_prior * ||delta_u - a_u||^2

The prior is a Gaussian centred on the amortised output, so the E-step only keeps what the user's own windows
say beyond what the map read off their history; ``hybrid_prior: 0`` is the unregularised refinement. em's
codeword term (prior_beta) is left out: it would pull every user toward a cluster centre, a shrinkage the
anchor already does better. The shared prompt and the map are frozen in phase 2: the map was trained with that
shared prompt, and new users are served by exactly that pair (below), so moving the prompt to suit the refined
residuals would mis-pair it with the map; freezing also keeps 'mean' (the population prompt) what phase 1 left.
Phase 2 refines every user, evaluation users included, on their train windows as em does (``unseen_eval_users``
keeps only the map off them).
Every epoch is evaluated and the best on the selection half is kept, so a refinement that does not beat the
amortised epoch it started from on held-out NLL is not kept. ``metrics["compute"]`` counts the LLM tokens each
phase trained on ("amortised", "e_step"), the unit issue 10 compares em / amortised / hybrid at; each epoch's
``hybrid`` entry says its phase and how far the residuals moved from the anchor (RMS over users of the L2 norm).

New users (``profile infer``) get the amortised output, one no-grad pass over their history: no gradient step
at serving time (``AmortisedFitter.infer``). Patience counts across both phases: set it above
``hybrid_map_epochs`` if phase 2 must run whatever phase 1 does. One process only, as amortised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from userip.profile.amortised import AmortisedFitter
from userip.profile.config import ProfileConfig
from userip.profile.corpus import Corpus
from userip.profile.em import EStep
from userip.profile.optim import RowAdam
from userip.profile.pooled import PooledStates


class HybridFitter(EStep, AmortisedFitter):
    """The amortised fit for ``hybrid_map_epochs`` epochs, then per-user E-steps anchored at its output."""

    def __init__(self, llm, cfg: ProfileConfig, corpus: Corpus, out_dir: Path | None = None,
                 states: PooledStates | None = None, progress: bool = False, read_history: bool = True) -> None:
        super().__init__(llm, cfg, corpus, out_dir, states=states, progress=progress, read_history=read_history)
        self.phases = ("amortised", "e_step")
        self.user_opt = RowAdam(self.profiles.table, lr=cfg.lr_user)
        self.shared_opt = RowAdam(self.profiles.shared[None], lr=cfg.lr_shared)  # unused: the prompt is frozen
        self.anchor: torch.Tensor | None = None  # [rows, m, n, H] the amortised output phase 2 started from
        self.last_phase = "amortised"

    def phase(self) -> str:
        return "amortised" if self.state.epoch < self.cfg.hybrid_map_epochs else "e_step"

    def train_epoch(self, g: torch.Generator, epochs: int, progress: bool) -> tuple[float, float]:
        self.last_phase = self.phase()
        if self.last_phase == "amortised":
            return super().train_epoch(g, epochs, progress)
        if self.anchor is None:
            self.start_refinement()
        return self.e_step_epoch(g, epochs, progress, shared=False)

    @torch.no_grad()
    def start_refinement(self) -> None:
        """Phase 2 starts from the best amortised epoch: each user's residual row = the map's output."""
        if self.best:
            self._restore(self.best)
        self.materialise(self.users)
        self.anchor = self.profiles.table.clone()

    def _prior(self, users: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        assert self.anchor is not None
        return self.cfg.hybrid_prior * (delta - self.anchor[self.rows(users)]).pow(2).sum()

    def drift(self) -> float:
        """RMS over users of ||delta_u - a_u||: how far phase 2 moved the residuals (0 before it)."""
        if self.anchor is None:
            return 0.0
        r = self.rows(self.users)
        return float((self.profiles.table[r] - self.anchor[r]).flatten(1).pow(2).sum(1).mean().sqrt())

    def epoch_metrics(self) -> dict[str, Any]:
        return {"hybrid": {"phase": self.last_phase, "drift": self.drift()}}

    def extra_checkpoint(self) -> dict[str, torch.Tensor]:
        out = super().extra_checkpoint()
        out["hybrid.phase"] = torch.tensor([self.phases.index(self.last_phase)])
        if self.anchor is not None:
            out["hybrid.anchor"] = self.anchor.clone()
            out.update({f"hybrid.user_opt.{k}": v.clone() for k, v in self.user_opt.state_dict().items()})
        return out

    def load_extra_checkpoint(self, t: dict[str, torch.Tensor]) -> None:
        super().load_extra_checkpoint(t)
        self.last_phase = self.phases[int(t["hybrid.phase"][0])] if "hybrid.phase" in t else "amortised"
        if "hybrid.anchor" in t:
            self.anchor = t["hybrid.anchor"].clone()
            self.user_opt.load_state_dict({k: t[f"hybrid.user_opt.{k}"] for k in ("exp_avg", "exp_avg_sq", "steps")})
