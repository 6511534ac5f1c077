"""Per-user EM inference (the paper): each user's residual fitted by MAP E-steps, one window per update.

E-step  for each user batch, with the LM, the shared prompt and the codebooks fixed, take ``inner_steps``
        MAP updates of each user's residual: behaviour NLL + lambda*||delta||^2 + beta*||delta - sg(t_u)||^2,
        where t_u = mu + s * c[z_u] is the user's codeword mapped back to residual space (a Gaussian-mixture
        prior whose means are the codebook). The last inner step also updates the shared prompt (M-step part 1,
        stochastic: its gradient is the sum of the batch users' gradients, so it costs no extra pass).
M-step  the shared closed-form codebook step (userip.profile.fitter).
``joint`` mode reproduces the reference code instead: LM loss, plus 0.5*||sg(x) - c||^2 moving the codebook
by gradient, no prior, no closed-form step. Row-wise lazy Adam (userip.profile.optim) keeps each user's
optimiser state and touches only the batch's rows. The E-step itself (``EStep``) is a mixin that
``userip.profile.hybrid`` reuses with its own prior.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from userip.monitor import release_memory
from userip.profile.config import ProfileConfig
from userip.profile.corpus import Corpus
from userip.profile.fitter import Fitter
from userip.profile.optim import RowAdam
from userip.profile.template import make_batch
from userip.quantize import assign, prepare_for_codes

log = logging.getLogger(__name__)


class EStep:
    """The per-user E-step, mixed into a ``Fitter`` (``ProfileFitter``; ``hybrid.HybridFitter`` after its
    amortised phase): ``inner_steps`` row-wise Adam updates of every user's table row per user batch, one
    window each, against the behaviour NLL + ``self._prior(users, delta)``, which the fitter defines. Needs
    ``self.user_opt`` and ``self.shared_opt`` (``RowAdam`` over the table and over the shared prompt).
    """

    def e_step_epoch(self, g: torch.Generator, epochs: int, progress: bool, shared: bool = True
                     ) -> tuple[float, float]:
        """E-step over every user batch (``inner_steps`` updates each; the last one also steps the shared prompt
        unless ``shared`` is False); returns (train NLL sum, token count)."""
        cfg, st = self.cfg, self.state
        batches = self._user_batches(g)
        # every rank takes the same number of shared-prompt steps (a short shard idles through the rest)
        n_batches = int(self.dist.all_reduce(torch.tensor([len(batches)]), "max"))
        nll_sum, tok_sum = 0.0, 0.0
        bar = tqdm(range(n_batches), desc=f"epoch {st.epoch + 1}/{epochs}", disable=not progress, leave=False)
        for b in bar:
            users = batches[b] if b < len(batches) else self.users[:0]
            windows = self._epoch_windows(users, st.epoch)
            for j in range(cfg.inner_steps):
                rows = [w[j % len(w)] for w in windows]
                s, n = self.train_step(users, rows, update_shared=shared and j == cfg.inner_steps - 1)
                nll_sum, tok_sum = nll_sum + s, tok_sum + n
            bar.set_postfix(nll=f"{nll_sum / max(tok_sum, 1):.3f}")
            if b % 8 == 7:
                release_memory()
        return nll_sum, tok_sum

    def train_step(self, users: torch.Tensor, rows: list[list[int]], update_shared: bool) -> tuple[float, float]:
        """One E-step update for ``users`` (unique), one window each; returns (NLL sum, token count)."""
        cfg, prof = self.cfg, self.profiles
        r = self.rows(users)
        delta = prof.table[r].clone().requires_grad_(True)
        shared = prof.shared.clone().requires_grad_(prof.residual and update_shared)
        mb = cfg.micro_batch or max(len(users), 1)
        nll_total, tok_total = 0.0, 0.0
        for s in range(0, len(users), mb):
            sl = slice(s, s + mb)
            theta = (shared + delta[sl]) if prof.residual else delta[sl]
            batch = make_batch(rows[sl])
            self.count_tokens(batch)
            sums, counts = self.scorer.row_nll(theta, batch)
            loss = (sums / counts).sum() + self._prior(users[sl], delta[sl])
            loss.backward()
            nll_total += float(sums.detach().sum())
            tok_total += float(counts.sum())
        if len(users):
            self.user_opt.step(r, delta.grad)
        if shared.requires_grad:
            grad = shared.grad if shared.grad is not None else torch.zeros_like(shared)
            self.shared_opt.step(torch.zeros(1, dtype=torch.long), self.dist.all_reduce(grad)[None])
        return nll_total, tok_total

    def _user_batches(self, g: torch.Generator) -> list[torch.Tensor]:
        """Shuffle users, then sort within chunks of 8 batches by window length so padding stays small."""
        order = self.users[torch.randperm(len(self.users), generator=g)]
        B = self.cfg.batch_users
        batches = []
        for s in range(0, len(order), 8 * B):
            chunk = order[s : s + 8 * B]
            lens = torch.tensor([np.mean([len(w) for w in self.corpus.train[int(u)]]) for u in chunk])
            chunk = chunk[torch.argsort(lens, stable=True)]
            batches += [chunk[i : i + B] for i in range(0, len(chunk), B)]
        perm = torch.randperm(len(batches), generator=g)
        return [batches[i] for i in perm.tolist()]

    def _epoch_windows(self, users: torch.Tensor, epoch: int) -> list[list[list[int]]]:
        """Each user's windows this epoch: at most ``windows_per_user``, rotating through long histories."""
        cap = self.cfg.windows_per_user
        out = []
        for u in users.tolist():
            w = self.corpus.train[u]
            start = (epoch * cap) % len(w)
            out.append([w[(start + i) % len(w)] for i in range(min(cap, len(w)))])
        return out


class ProfileFitter(EStep, Fitter):
    """Per-user EM: residual (or plain) table rows fitted by E-steps; ``mode: joint`` is the reference loss."""

    def __init__(self, llm, cfg: ProfileConfig, corpus: Corpus, out_dir: Path | None = None) -> None:
        super().__init__(llm, cfg, corpus, out_dir)
        self.user_opt = RowAdam(self.profiles.table, lr=cfg.lr_user)
        self.shared_opt = RowAdam(self.profiles.shared[None], lr=cfg.lr_shared)
        self.joint_opt: torch.optim.Optimizer | None = None

    def train_epoch(self, g: torch.Generator, epochs: int, progress: bool) -> tuple[float, float]:
        return self.e_step_epoch(g, epochs, progress)

    def train_step(self, users: torch.Tensor, rows: list[list[int]], update_shared: bool) -> tuple[float, float]:
        out = super().train_step(users, rows, update_shared)
        if self.cfg.mode == "joint" and len(users):
            self._joint_codebook_step(users)
        return out

    def _prior(self, users: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        cfg, st = self.cfg, self.state
        if cfg.mode != "em":
            return delta.new_zeros(())
        personal = delta if self.profiles.residual else delta - self.profiles.population(self.pop_rows)
        prior = cfg.prior_lambda * personal.pow(2).sum() if self.profiles.residual else delta.new_zeros(())
        if cfg.prior_beta > 0 and st.z is not None:
            prior = prior + cfg.prior_beta * (personal - self.code_targets(users).detach()).pow(2).sum()
        return prior

    def _joint_codebook_step(self, users: torch.Tensor) -> None:
        """Reference-code VQ loss: 0.5*||sg(x) - c_z||^2 for the batch users, gradient on the codebook only."""
        st, prof = self.state, self.profiles
        assert self.joint_opt is not None
        self.joint_opt.zero_grad()
        loss = torch.zeros(())
        centre = None if prof.residual else prof.population(self.pop_rows)
        for k, p in enumerate(self.cfg.profiles):
            with torch.no_grad():
                mu = prof.personal(self.pop_rows, centre)[:, k, : p.n_tokens].mean(0).flatten()
                x = prepare_for_codes(prof.personal(self.rows(users), centre)[:, k, : p.n_tokens].flatten(1), center=mu)
            cb = st.codebooks[p.name]
            idx, _ = assign(x, cb.detach())
            st.z[users, k] = idx + 1
            loss = loss + self.cfg.joint_beta * 0.5 * (x - cb[idx]).pow(2).sum(1).mean()
        loss.backward()
        self.joint_opt.step()

    def infer(self, users: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Fit only ``users``' residuals with the LM, shared prompt and codebooks frozen; return their codes.

        Each user gets the training budget (``epochs`` x ``inner_steps`` updates, one window each). The
        codeword prior is left out (a new user has no code yet); the L2 prior is kept.
        Returns 1-based codes [len(users), m], also written into ``state.z``.
        """
        cfg, st, prof = self.cfg, self.state, self.profiles
        if st.z is None or not st.codebooks:
            raise ValueError("infer needs a fitted model (codebooks)")
        users = torch.as_tensor(users, dtype=torch.long)
        r = self.rows(users)
        prof.table[r] = 0.0
        self.user_opt.exp_avg[r] = 0.0
        self.user_opt.exp_avg_sq[r] = 0.0
        self.user_opt.steps[r] = 0
        saved_beta, self.cfg.prior_beta = cfg.prior_beta, 0.0
        try:
            for epoch in tqdm(range(cfg.epochs), desc="infer", disable=not progress, leave=False):
                for s in range(0, len(users), cfg.batch_users):
                    batch = users[s : s + cfg.batch_users]
                    windows = self._epoch_windows(batch, epoch)
                    for j in range(cfg.inner_steps):
                        self.train_step(batch, [w[j % len(w)] for w in windows], update_shared=False)
        finally:
            self.cfg.prior_beta = saved_beta
        with torch.no_grad():
            personal = prof.personal(r, None if prof.residual else prof.population(self.pop_rows))
            for k, p in enumerate(cfg.profiles):
                x = prepare_for_codes(personal[:, k, : p.n_tokens].flatten(1), center=st.mu[k, : p.n_tokens].flatten())
                idx, _ = assign(x, st.codebooks[p.name])
                st.z[users, k] = idx + 1
        return st.z[users].clone()


    # ------------------------------------------------------------------ hooks of the shared loop
    def before_fit(self) -> None:
        if self.cfg.mode == "joint" and not self.state.codebooks:
            self.m_step(torch.Generator().manual_seed(self.cfg.seed), iters=0)

    def after_m_step(self) -> None:
        if self.cfg.mode == "joint" and self.joint_opt is None:
            # the same tensors are kept across epochs, so the optimiser state stays valid
            leaves = [self.state.codebooks[p.name].requires_grad_(True) for p in self.cfg.profiles]
            self.joint_opt = torch.optim.Adam(leaves, lr=self.cfg.lr_shared)

    def extra_checkpoint(self) -> dict[str, torch.Tensor]:
        t = {f"user_opt.{k}": v for k, v in self.user_opt.state_dict().items()}
        t.update({f"shared_opt.{k}": v for k, v in self.shared_opt.state_dict().items()})
        if self.joint_opt is not None:
            for i, s in enumerate(self.joint_opt.state.values()):
                t.update({f"joint_opt.{i}.{k}": v for k, v in s.items()})
        return t

    def load_extra_checkpoint(self, t: dict[str, torch.Tensor]) -> None:
        self.user_opt.load_state_dict({k: t[f"user_opt.{k}"] for k in ("exp_avg", "exp_avg_sq", "steps")})
        self.shared_opt.load_state_dict({k: t[f"shared_opt.{k}"] for k in ("exp_avg", "exp_avg_sq", "steps")})
        st = self.state
        if self.cfg.mode == "joint" and st.codebooks:
            leaves = [st.codebooks[p.name].requires_grad_(True) for p in self.cfg.profiles]
            self.joint_opt = torch.optim.Adam(leaves, lr=self.cfg.lr_shared)
            states: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in t.items():
                if k.startswith("joint_opt."):
                    _, i, name = k.split(".", 2)
                    states.setdefault(int(i), {})[name] = v
            for i, leaf in enumerate(leaves):
                if i in states:
                    self.joint_opt.state[leaf] = states[i]
