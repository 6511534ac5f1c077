"""The EM loop that fits soft user profiles, readable top to bottom (nanoGPT-style).

E-step  for each user batch, with the LM, the shared prompt and the codebooks fixed, take ``inner_steps``
        MAP updates of each user's residual: behaviour NLL + lambda*||delta||^2 + beta*||delta - sg(t_u)||^2,
        where t_u = mu + s * c[z_u] is the user's codeword mapped back to residual space (a Gaussian-mixture
        prior whose means are the codebook). The last inner step also updates the shared prompt (M-step part 1,
        stochastic: its gradient is the sum of the batch users' gradients, so it costs no extra pass).
M-step  after each epoch: per profile, closed-form k-means steps on the centred, L2-normalised personal part
        of every user (k-means++ init, dead codes re-seeded from the worst-fitted users), and the prior's scale
        s from the spread of the residuals.
``joint`` mode reproduces the reference code instead: LM loss, plus 0.5*||sg(x) - c||^2 moving the codebook
by gradient, no prior, no closed-form step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from userip.io import atomic_path, read_json, write_json
from userip.profile.config import ProfileConfig
from userip.profile.model import Scorer, SoftProfiles, text_init_embeddings
from userip.profile.optim import RowAdam
from userip.profile.template import encode_behaviour, make_batch
from userip.quantize import (
    assign,
    code_sums,
    kmeans_pp_init,
    perplexity,
    prepare_for_codes,
    reseed_dead,
    update_from_sums,
    usage,
)

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    """Tokenised behaviour windows: per user_idx, train windows and held-out (validation-period) windows."""

    train: dict[int, list[list[int]]]
    heldout: dict[int, list[list[int]]]
    n_users: int  # largest user_idx (table has n_users + 1 rows)
    activity: np.ndarray  # [n_users + 1] train interactions per user

    @classmethod
    def from_text(cls, tokenizer, train: dict[int, list[str]], heldout: dict[int, list[str]], n_users: int,
                  activity: np.ndarray, max_tokens: int) -> Corpus:
        def enc(d: dict[int, list[str]]) -> dict[int, list[list[int]]]:
            out = {}
            for u, wins in d.items():
                toks = [encode_behaviour(tokenizer, w, max_tokens) for w in wins if w.strip()]
                toks = [t for t in toks if t]
                if toks:
                    out[int(u)] = toks
            return out

        return cls(enc(train), enc(heldout), n_users, np.asarray(activity))


@dataclass
class EMState:
    """Everything a resumed run needs besides the config: saved to checkpoints/ after each epoch."""

    epoch: int = 0  # epochs completed
    codebooks: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [K, n*H] (normalised space)
    z: torch.Tensor | None = None  # [U+1, m] 1-based codes, 0 = none
    mu: torch.Tensor | None = None  # [m, n, H] centre of the personal part
    scale: torch.Tensor | None = None  # [m] RMS spread of the personal part (the prior's scale)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_nll: float = math.inf
    bad_epochs: int = 0


class ProfileFitter:
    def __init__(self, llm, cfg: ProfileConfig, corpus: Corpus, out_dir: Path | None = None) -> None:
        self.llm, self.cfg, self.corpus = llm, cfg, corpus
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.scorer = Scorer(llm, cfg)
        self.users = torch.tensor(sorted(corpus.train), dtype=torch.long)
        if len(self.users) == 0:
            raise ValueError("no user has behaviour windows to fit")
        g = torch.Generator().manual_seed(cfg.seed)
        init = text_init_embeddings(llm, cfg) if cfg.init == "text" else None
        self.profiles = SoftProfiles(cfg, corpus.n_users, llm.hidden_size, init, g)
        self.user_opt = RowAdam(self.profiles.table, lr=cfg.lr_user)
        self.shared_opt = RowAdam(self.profiles.shared[None], lr=cfg.lr_shared)
        self.state = EMState()
        self.joint_opt: torch.optim.Optimizer | None = None
        self.eval_users = self._pick_eval_users()
        self.pop_users = self.users  # users whose mean is the plain table's population prompt
        self.best: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ main loop
    def fit(self, epochs: int | None = None, progress: bool = True) -> EMState:
        cfg, st = self.cfg, self.state
        epochs = epochs or cfg.epochs
        self._resume()
        if cfg.mode == "joint" and not st.codebooks:
            self.m_step(torch.Generator().manual_seed(cfg.seed), iters=0)
        while st.epoch < epochs and st.bad_epochs < cfg.patience:
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.epoch)
            batches = self._user_batches(g)
            nll_sum, tok_sum = 0.0, 0.0
            bar = tqdm(batches, desc=f"epoch {st.epoch + 1}/{epochs}", disable=not progress, leave=False)
            for users in bar:
                windows = self._epoch_windows(users, st.epoch)
                for j in range(cfg.inner_steps):
                    rows = [w[j % len(w)] for w in windows]
                    s, n = self.train_step(users, rows, update_shared=(j == cfg.inner_steps - 1))
                    nll_sum, tok_sum = nll_sum + s, tok_sum + n
                bar.set_postfix(nll=f"{nll_sum / max(tok_sum, 1):.3f}")
            if cfg.mode == "em":
                self.m_step(g, iters=cfg.kmeans_iters)
            else:
                self.m_step(g, iters=0)  # joint: only refresh assignments and the scale for reporting
            st.epoch += 1
            m = {"epoch": st.epoch, "train_nll": nll_sum / max(tok_sum, 1)}
            m.update(self.evaluate())
            m.update(self.code_stats())
            m["wall_s"] = time.perf_counter() - t0
            m["rss_mb"] = _rss_mb()
            st.metrics.append(m)
            if m["heldout"]["own"] < st.best_nll - 1e-6:
                st.best_nll, st.best_epoch, st.bad_epochs = m["heldout"]["own"], st.epoch, 0
                self.best = self._snapshot()
            else:
                st.bad_epochs += 1
            if progress:
                log.info(_epoch_line(m))
                tqdm.write(_epoch_line(m))
            self._checkpoint()
        if self.best:
            self._restore(self.best)
        return st

    def train_step(self, users: torch.Tensor, rows: list[list[int]], update_shared: bool) -> tuple[float, float]:
        """One E-step update for ``users`` (unique), one window each; returns (NLL sum, token count)."""
        cfg, prof = self.cfg, self.profiles
        batch = make_batch(rows)
        delta = prof.table[users].clone().requires_grad_(True)
        shared = prof.shared.clone().requires_grad_(prof.residual and update_shared)
        mb = cfg.micro_batch or len(users)
        nll_total, tok_total = 0.0, 0.0
        for s in range(0, len(users), mb):
            sl = slice(s, s + mb)
            theta = (shared + delta[sl]) if prof.residual else delta[sl]
            sub = make_batch(rows[sl]) if mb < len(users) else batch
            sums, counts = self.scorer.row_nll(theta, sub)
            loss = (sums / counts).sum() + self._prior(users[sl], delta[sl])
            loss.backward()
            nll_total += float(sums.detach().sum())
            tok_total += float(counts.sum())
        self.user_opt.step(users, delta.grad)
        if shared.grad is not None:
            self.shared_opt.step(torch.zeros(1, dtype=torch.long), shared.grad[None])
        if cfg.mode == "joint":
            self._joint_codebook_step(users)
        return nll_total, tok_total

    def _prior(self, users: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        cfg, st = self.cfg, self.state
        if cfg.mode != "em":
            return delta.new_zeros(())
        personal = delta if self.profiles.residual else delta - self.profiles.population(self.pop_users)
        prior = cfg.prior_lambda * personal.pow(2).sum() if self.profiles.residual else delta.new_zeros(())
        if cfg.prior_beta > 0 and st.z is not None:
            prior = prior + cfg.prior_beta * (personal - self.code_targets(users).detach()).pow(2).sum()
        return prior

    # ------------------------------------------------------------------ M-step and codes
    def code_targets(self, users: torch.Tensor) -> torch.Tensor:
        """Each user's codeword mapped back to personal space: mu + s * c[z_u] -> [B, m, n, H]."""
        st, prof = self.state, self.profiles
        out = torch.zeros(len(users), prof.m, prof.n, prof.hidden)
        for k, p in enumerate(self.cfg.profiles):
            cb = st.codebooks[p.name].detach()
            c = cb[(st.z[users, k] - 1).clamp(min=0)].view(len(users), p.n_tokens, prof.hidden)
            out[:, k, : p.n_tokens] = st.mu[k, : p.n_tokens] + st.scale[k] * c
        return out

    def _personal_flat(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised personal vectors [U, n*H], centre [n, H], RMS scale) of profile k over all users."""
        n_k = self.cfg.profiles[k].n_tokens
        P = self.profiles.personal(self.users)[:, k, :n_k]
        mu = P.mean(0)
        scale = (P - mu).flatten(1).pow(2).sum(1).mean().sqrt()
        X = prepare_for_codes(P.flatten(1), center=mu.flatten())
        return X, mu, scale

    @torch.no_grad()
    def m_step(self, g: torch.Generator, iters: int) -> None:
        st, prof = self.state, self.profiles
        if st.z is None:
            st.z = torch.zeros(self.corpus.n_users + 1, prof.m, dtype=torch.long)
            st.mu = torch.zeros(prof.m, prof.n, prof.hidden)
            st.scale = torch.zeros(prof.m)
        for k, p in enumerate(self.cfg.profiles):
            X, mu, scale = self._personal_flat(k)
            st.mu[k, : p.n_tokens], st.scale[k] = mu, scale
            cb = st.codebooks.get(p.name)
            if cb is None:
                cb = kmeans_pp_init(X, p.codebook_size, g)
            cb = cb.detach().clone()
            for _ in range(iters):
                idx, sqd = assign(X, cb)
                sums, counts = code_sums(X, idx, p.codebook_size)
                cb, dead = update_from_sums(cb, sums, counts)
                if bool(dead.any()):
                    cb = reseed_dead(cb, dead, X, sqd, g)
            idx, _ = assign(X, cb)
            st.codebooks[p.name] = cb
            st.z[self.users, k] = idx + 1
        if self.cfg.mode == "joint":
            leaves = [st.codebooks[p.name].requires_grad_(True) for p in self.cfg.profiles]
            if self.joint_opt is None:
                self.joint_opt = torch.optim.Adam(leaves, lr=self.cfg.lr_shared)
            else:  # same tensors are kept across epochs, so the optimiser state stays valid
                pass

    def _joint_codebook_step(self, users: torch.Tensor) -> None:
        """Reference-code VQ loss: 0.5*||sg(x) - c_z||^2 for the batch users, gradient on the codebook only."""
        st = self.state
        assert self.joint_opt is not None
        self.joint_opt.zero_grad()
        loss = torch.zeros(())
        for k, p in enumerate(self.cfg.profiles):
            with torch.no_grad():
                P = self.profiles.personal(self.users)[:, k, : p.n_tokens]
                mu = P.mean(0).flatten()
                x = prepare_for_codes(self.profiles.personal(users)[:, k, : p.n_tokens].flatten(1), center=mu)
            cb = st.codebooks[p.name]
            idx, _ = assign(x, cb.detach())
            st.z[users, k] = idx + 1
            loss = loss + self.cfg.joint_beta * 0.5 * (x - cb[idx]).pow(2).sum(1).mean()
        loss.backward()
        self.joint_opt.step()

    # ------------------------------------------------------------------ evaluation
    def _pick_eval_users(self) -> torch.Tensor:
        users = [u for u in sorted(self.corpus.heldout) if u in self.corpus.train]
        if self.cfg.eval_users and len(users) > self.cfg.eval_users:
            g = torch.Generator().manual_seed(self.cfg.seed + 7)
            pick = torch.randperm(len(users), generator=g)[: self.cfg.eval_users]
            users = sorted(users[i] for i in pick.tolist())
        return torch.tensor(users, dtype=torch.long)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out NLL with own / shuffled / mean / codeword soft tokens, token-weighted and per user."""
        users = self.eval_users
        if len(users) < 2:
            return {}
        prof, st = self.profiles, self.state
        base = prof.base(self.users)
        personal = prof.personal(users, centre=prof.population(self.users) if not prof.residual else None)
        g = torch.Generator().manual_seed(self.cfg.seed + 11)
        perm = _derangement(len(users), g)
        variants = {
            "own": base + personal,
            "shuffled": base + personal[perm],
            "mean": (base + prof.personal(self.users, None if prof.residual else prof.population(self.users))
                     .mean(0)).expand_as(personal),
        }
        if st.z is not None and st.codebooks:
            variants["codeword"] = base + self.code_targets(users)
        sums = {k: torch.zeros(len(users)) for k in variants}
        toks = torch.zeros(len(users))
        bs = max(1, self.cfg.batch_users // len(variants))
        for s in range(0, len(users), bs):
            idx = list(range(s, min(s + bs, len(users))))
            rows, owner = [], []
            for i in idx:
                for w in self.corpus.heldout[int(users[i])]:
                    rows.append(w)
                    owner.append(i)
            owner_t = torch.tensor(owner)
            theta = torch.cat([variants[k][owner_t] for k in variants])
            rsum, rcount = self.scorer.row_nll(theta, make_batch(rows * len(variants)))
            n = len(rows)
            for j, k in enumerate(variants):
                sums[k].index_add_(0, owner_t, rsum[j * n : (j + 1) * n].cpu())
            toks.index_add_(0, owner_t, rcount[:n].cpu())
        heldout = {k: float(v.sum() / toks.sum()) for k, v in sums.items()}
        per_user = {k: float((v / toks).mean()) for k, v in sums.items()}
        return {
            "heldout": heldout,
            "heldout_user": per_user,
            "gap_own_vs_mean": heldout["mean"] - heldout["own"],
            "gap_own_vs_mean_user": per_user["mean"] - per_user["own"],
            "gap_own_vs_shuffled": heldout["shuffled"] - heldout["own"],
            "gap_own_vs_shuffled_user": per_user["shuffled"] - per_user["own"],
            "eval_users": len(users),
            "eval_tokens": int(toks.sum()),
        }

    def code_stats(self) -> dict[str, Any]:
        from sklearn.metrics import normalized_mutual_info_score

        st = self.state
        if st.z is None:
            return {}
        act = self.corpus.activity[self.users.numpy()]
        quart = np.searchsorted(np.quantile(act, [0.25, 0.5, 0.75]), act, side="right")
        out = {}
        for k, p in enumerate(self.cfg.profiles):
            z = st.z[self.users, k] - 1
            out[p.name] = {
                "usage": usage(z, p.codebook_size).tolist(),
                "perplexity": float(perplexity(z, p.codebook_size)),
                "dead": int((usage(z, p.codebook_size) == 0).sum()),
                "nmi_activity": float(normalized_mutual_info_score(quart, z.numpy())),
            }
        return {"codes": out}

    # ------------------------------------------------------------------ batching
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

    # ------------------------------------------------------------------ checkpoints
    def _snapshot(self) -> dict[str, torch.Tensor]:
        st = self.state
        snap = {f"profiles.{k}": v for k, v in self.profiles.state_dict().items()}
        snap.update({f"codebook.{k}": v.detach().clone() for k, v in st.codebooks.items()})
        if st.z is not None:
            snap.update({"z": st.z.clone(), "mu": st.mu.clone(), "scale": st.scale.clone()})
        return snap

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        st = self.state
        self.profiles.load_state_dict({"shared": snap["profiles.shared"], "table": snap["profiles.table"]})
        for k in list(st.codebooks):
            if f"codebook.{k}" in snap:
                st.codebooks[k] = snap[f"codebook.{k}"].clone()
        if "z" in snap:
            st.z, st.mu, st.scale = snap["z"].clone(), snap["mu"].clone(), snap["scale"].clone()

    def _checkpoint(self) -> None:
        if self.out_dir is None:
            return
        ck = self.out_dir / "checkpoints"
        ck.mkdir(parents=True, exist_ok=True)
        tensors = self._snapshot()
        tensors.update({f"user_opt.{k}": v for k, v in self.user_opt.state_dict().items()})
        tensors.update({f"shared_opt.{k}": v for k, v in self.shared_opt.state_dict().items()})
        tensors.update({f"best.{k}": v for k, v in self.best.items()})
        if self.joint_opt is not None:
            for i, s in enumerate(self.joint_opt.state.values()):
                tensors.update({f"joint_opt.{i}.{k}": v for k, v in s.items()})
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        with atomic_path(ck / "last.safetensors") as tmp:
            save_file(tensors, str(tmp))
        st = self.state
        write_json(ck / "last.json", {
            "epoch": st.epoch, "metrics": st.metrics, "best_epoch": st.best_epoch, "best_nll": st.best_nll,
            "bad_epochs": st.bad_epochs, "config": self.cfg.to_dict(),
        })

    def _resume(self) -> None:
        if self.out_dir is None:
            return
        ck = self.out_dir / "checkpoints"
        if not (ck / "last.json").exists() or not (ck / "last.safetensors").exists():
            return
        meta = read_json(ck / "last.json")
        saved = dict(meta["config"])
        now = self.cfg.to_dict()
        for key in ("epochs", "patience", "threads"):  # may change between a run and its continuation
            saved.pop(key, None)
            now.pop(key, None)
        if saved != now:
            log.warning("checkpoint in %s was made with another config: starting afresh", ck)
            return
        t = load_file(str(ck / "last.safetensors"))
        st = self.state
        st.epoch, st.metrics = meta["epoch"], meta["metrics"]
        st.best_epoch, st.best_nll, st.bad_epochs = meta["best_epoch"], meta["best_nll"], meta["bad_epochs"]
        for p in self.cfg.profiles:
            if f"codebook.{p.name}" in t:
                st.codebooks[p.name] = t[f"codebook.{p.name}"].clone()
        self._restore(t)
        self.user_opt.load_state_dict({k: t[f"user_opt.{k}"] for k in ("exp_avg", "exp_avg_sq", "steps")})
        self.shared_opt.load_state_dict({k: t[f"shared_opt.{k}"] for k in ("exp_avg", "exp_avg_sq", "steps")})
        self.best = {k[len("best."):]: v for k, v in t.items() if k.startswith("best.")}
        if self.cfg.mode == "joint" and st.codebooks:
            leaves = [st.codebooks[p.name].requires_grad_(True) for p in self.cfg.profiles]
            self.joint_opt = torch.optim.Adam(leaves, lr=self.cfg.lr_shared)
            states = {}
            for k, v in t.items():
                if k.startswith("joint_opt."):
                    _, i, name = k.split(".", 2)
                    states.setdefault(int(i), {})[name] = v
            for i, leaf in enumerate(leaves):
                if i in states:
                    self.joint_opt.state[leaf] = states[i]
        log.info("resumed from %s after epoch %d", ck, st.epoch)

    # ------------------------------------------------------------------ new users
    def infer(self, users: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Fit only ``users``' residuals with the LM, shared prompt and codebooks frozen; return their codes.

        Each user gets the same budget as in training (``epochs * min(windows, cap)`` updates, one window
        each); the codeword prior is left out because a new user has no code yet, the L2 prior is kept.
        Returns 1-based codes [len(users), m], also written into ``state.z``.
        """
        cfg, st, prof = self.cfg, self.state, self.profiles
        if st.z is None or not st.codebooks:
            raise ValueError("infer needs a fitted model (codebooks)")
        users = torch.as_tensor(users, dtype=torch.long)
        prof.table[users] = 0.0
        self.user_opt.exp_avg[users] = 0.0
        self.user_opt.exp_avg_sq[users] = 0.0
        self.user_opt.steps[users] = 0
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
            personal = prof.personal(users, None if prof.residual else prof.population(self.pop_users))
            for k, p in enumerate(cfg.profiles):
                x = prepare_for_codes(personal[:, k, : p.n_tokens].flatten(1), center=st.mu[k, : p.n_tokens].flatten())
                idx, _ = assign(x, st.codebooks[p.name])
                st.z[users, k] = idx + 1
        return st.z[users].clone()

    def load_fitted(self) -> None:
        """Load the best fitted state from ``out_dir/checkpoints`` (for inference on new users)."""
        assert self.out_dir is not None
        ck = self.out_dir / "checkpoints" / "last.safetensors"
        if not ck.exists():
            raise FileNotFoundError(ck)
        t = load_file(str(ck))
        snap = {k[len("best."):]: v for k, v in t.items() if k.startswith("best.")} or t
        for p in self.cfg.profiles:
            self.state.codebooks[p.name] = snap[f"codebook.{p.name}"].clone()
        # the fitted table may have fewer rows than this one (new users are appended after the fitted rows)
        n_old = snap["profiles.table"].shape[0]
        if n_old > self.profiles.table.shape[0]:
            raise ValueError(f"checkpoint has {n_old} table rows, more than this corpus can hold")
        st = self.state
        st.z = torch.zeros(self.profiles.table.shape[0], self.profiles.m, dtype=torch.long)
        st.z[:n_old] = snap["z"]
        st.mu, st.scale = snap["mu"].clone(), snap["scale"].clone()
        self.profiles.shared.copy_(snap["profiles.shared"])
        self.profiles.table[:n_old] = snap["profiles.table"]
        self.pop_users = (snap["z"][:, 0] > 0).nonzero().flatten()

    # ------------------------------------------------------------------ results
    def assignments(self) -> torch.Tensor:
        """1-based code per fitted user and profile [U+1, m] (0 for users not fitted)."""
        assert self.state.z is not None
        return self.state.z.clone()

    def theta_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta, personal) for every row of the table; rows of users not fitted are zero."""
        prof = self.profiles
        all_rows = torch.arange(self.corpus.n_users + 1)
        centre = None if prof.residual else prof.population(self.users)
        personal = prof.personal(all_rows, centre)
        theta = prof.base(self.users) + personal
        fitted = torch.zeros(len(all_rows), dtype=torch.bool)
        fitted[self.users] = True
        theta[~fitted] = 0
        personal[~fitted] = 0
        return theta.contiguous(), personal.contiguous()


def _derangement(n: int, g: torch.Generator) -> torch.Tensor:
    """A random permutation with no fixed point (a user never gets their own tokens as 'shuffled')."""
    perm = torch.randperm(n, generator=g)
    return torch.roll(perm, 1)[torch.argsort(perm)]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _epoch_line(m: dict[str, Any]) -> str:
    h = m.get("heldout", {})
    parts = [f"epoch {m['epoch']}", f"train {m['train_nll']:.4f}"]
    if h:
        parts.append("held-out own {own:.4f} shuffled {shuffled:.4f} mean {mean:.4f}".format(**h))
        if "codeword" in h:
            parts.append(f"codeword {h['codeword']:.4f}")
        parts.append(f"gap own-vs-mean {m['gap_own_vs_mean']:+.4f} (per user {m['gap_own_vs_mean_user']:+.4f})")
    for name, c in m.get("codes", {}).items():
        parts.append(f"{name} ppl {c['perplexity']:.2f} nmi-act {c['nmi_activity']:.2f}")
    return " | ".join(parts)
