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
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from userip.data.text import SEP
from userip.errors import UseripError
from userip.io import atomic_path, read_json, write_json
from userip.monitor import release_memory
from userip.profile.config import ProfileConfig
from userip.profile.dist import Dist
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
    """Tokenised behaviour windows: per user_idx, train windows and held-out (validation-period) windows.

    For evaluation it may also hold, per held-out window, its item count and which tokens are the user's
    rating ('rated' text), and per user the ceiling's in-context history (token ids of the last N train items).
    """

    train: dict[int, list[list[int]]]
    heldout: dict[int, list[list[int]]]
    n_users: int  # largest user_idx (table has n_users + 1 rows)
    activity: np.ndarray  # [n_users + 1] train interactions per user
    heldout_items: dict[int, list[int]] = field(default_factory=dict)
    heldout_marks: dict[int, list[list[bool]]] = field(default_factory=dict)
    context: dict[int, list[int]] = field(default_factory=dict)

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
    """Fits soft profiles for the users of ``corpus`` (this rank's shard when run under torch.distributed)."""

    def __init__(self, llm, cfg: ProfileConfig, corpus: Corpus, out_dir: Path | None = None) -> None:
        self.llm, self.cfg, self.corpus = llm, cfg, corpus
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.dist = Dist()
        if self.dist.world > 1 and (cfg.mode != "em" or cfg.table != "residual"):
            raise UseripError("a sharded fit (--nproc > 1) supports mode 'em' with table 'residual' only")
        self.scorer = Scorer(llm, cfg)
        self.users = torch.tensor(sorted(corpus.train), dtype=torch.long)  # this rank's users
        all_users = sorted(u for part in self.dist.gather(self.users.tolist()) for u in part)
        self.all_users = torch.tensor(all_users, dtype=torch.long)
        if len(self.all_users) == 0:
            raise ValueError("no user has behaviour windows to fit")
        n_rows = corpus.n_users + 1
        self.row_of = torch.zeros(n_rows, dtype=torch.long)  # global user index -> row of the local table
        if self.dist.world == 1:
            self.row_of = torch.arange(n_rows)
            local = None
        else:
            self.row_of[self.users] = torch.arange(1, len(self.users) + 1)
            local = self.users
        g = torch.Generator().manual_seed(cfg.seed)
        init = text_init_embeddings(llm, cfg) if cfg.init == "text" else None
        self.profiles = SoftProfiles(cfg, corpus.n_users, llm.hidden_size, init, g, local_users=local)
        self.user_opt = RowAdam(self.profiles.table, lr=cfg.lr_user)
        self.shared_opt = RowAdam(self.profiles.shared[None], lr=cfg.lr_shared)
        self.state = EMState()
        self.joint_opt: torch.optim.Optimizer | None = None
        self.eval_users = self._pick_eval_users()
        self.pop_rows = self.rows(self.users)  # rows whose mean is the plain table's population prompt
        self.best: dict[str, torch.Tensor] = {}

    def rows(self, users: torch.Tensor) -> torch.Tensor:
        return self.row_of[users]

    # ------------------------------------------------------------------ main loop
    def fit(self, epochs: int | None = None, progress: bool = True) -> EMState:
        cfg, st = self.cfg, self.state
        epochs = epochs or cfg.epochs
        progress = progress and self.dist.is_main
        self._resume()
        if cfg.mode == "joint" and not st.codebooks:
            self.m_step(torch.Generator().manual_seed(cfg.seed), iters=0)
        while st.epoch < epochs and st.bad_epochs < cfg.patience:
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.epoch)
            nll_sum, tok_sum = self.train_epoch(g, epochs, progress)
            self.m_step(g, iters=cfg.kmeans_iters if cfg.mode == "em" else 0)  # joint: refresh for reporting
            st.epoch += 1
            totals = self.dist.all_reduce(torch.tensor([nll_sum, tok_sum], dtype=torch.float64))
            m = {"epoch": st.epoch, "train_nll": float(totals[0] / max(float(totals[1]), 1.0))}
            m.update(self.evaluate())
            m.update(self.code_stats())
            m["wall_s"] = time.perf_counter() - t0
            m["rss_mb"] = _rss_mb()
            st.metrics.append(m)
            # select on the selection half of the evaluation users (reported figures come from the other half)
            score = m["select"]["heldout"]["own"] if "select" in m else m["heldout"]["own"] if "heldout" in m \
                else m["train_nll"]  # no held-out users: train NLL
            if score < st.best_nll - 1e-6:
                st.best_nll, st.best_epoch, st.bad_epochs = score, st.epoch, 0
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

    def train_epoch(self, g: torch.Generator, epochs: int, progress: bool) -> tuple[float, float]:
        """E-step over every user batch (``inner_steps`` updates each); returns (train NLL sum, token count)."""
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
                s, n = self.train_step(users, rows, update_shared=(j == cfg.inner_steps - 1))
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
            sums, counts = self.scorer.row_nll(theta, make_batch(rows[sl]))
            loss = (sums / counts).sum() + self._prior(users[sl], delta[sl])
            loss.backward()
            nll_total += float(sums.detach().sum())
            tok_total += float(counts.sum())
        if len(users):
            self.user_opt.step(r, delta.grad)
        if shared.requires_grad:
            grad = shared.grad if shared.grad is not None else torch.zeros_like(shared)
            self.shared_opt.step(torch.zeros(1, dtype=torch.long), self.dist.all_reduce(grad)[None])
        if cfg.mode == "joint" and len(users):
            self._joint_codebook_step(users)
        return nll_total, tok_total

    def _prior(self, users: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        cfg, st = self.cfg, self.state
        if cfg.mode != "em":
            return delta.new_zeros(())
        personal = delta if self.profiles.residual else delta - self.profiles.population(self.pop_rows)
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
        """(this rank's normalised personal vectors [U_local, n*H], global centre [n, H], global RMS scale)."""
        n_k = self.cfg.profiles[k].n_tokens
        prof = self.profiles
        centre = None if prof.residual else prof.population(self.pop_rows)
        P = prof.personal(self.rows(self.users), centre)[:, k, :n_k].double()
        count = torch.tensor([float(len(P))], dtype=torch.float64)
        stats = self.dist.all_reduce(torch.cat([P.sum(0).flatten(), count]))
        mu = (stats[:-1] / stats[-1]).view(n_k, -1)
        sq = self.dist.all_reduce((P - mu).flatten(1).pow(2).sum().reshape(1))
        scale = (sq / stats[-1]).sqrt()[0]
        X = prepare_for_codes(P.flatten(1).float(), center=mu.flatten().float())
        return X, mu.float(), scale.float()

    @torch.no_grad()
    def m_step(self, g: torch.Generator, iters: int) -> None:
        """Closed-form codebook update from every user's personal part (sums and counts reduced over ranks)."""
        st, prof = self.state, self.profiles
        if st.z is None:
            st.z = torch.zeros(self.corpus.n_users + 1, prof.m, dtype=torch.long)
            st.mu = torch.zeros(prof.m, prof.n, prof.hidden)
            st.scale = torch.zeros(prof.m)
        for k, p in enumerate(self.cfg.profiles):
            X, mu, scale = self._personal_flat(k)
            st.mu[k, : p.n_tokens], st.scale[k] = mu, scale
            cb = st.codebooks.get(p.name)
            if cb is None:  # k-means++ on everyone's vectors, in global user order (the same on every rank)
                parts = self.dist.gather((self.users, X))
                all_u = torch.cat([u for u, _ in parts])
                all_x = torch.cat([x for _, x in parts])[torch.argsort(all_u)]
                cb = kmeans_pp_init(all_x, p.codebook_size, g)
            if iters:  # joint mode (iters=0) keeps its codebook tensors: its optimiser holds them
                cb = cb.detach().clone()
                for _ in range(iters):
                    idx, sqd = assign(X, cb)
                    sums, counts = code_sums(X, idx, p.codebook_size)
                    self.dist.all_reduce(sums)
                    self.dist.all_reduce(counts)
                    cb, dead = update_from_sums(cb, sums, counts)
                    if bool(dead.any()):
                        cb = self._reseed(cb, dead, X, sqd, g)
            st.codebooks[p.name] = cb
            idx, _ = assign(X, cb.detach())
            z = torch.zeros(self.corpus.n_users + 1, dtype=torch.long)
            z[self.users] = idx + 1
            st.z[:, k] = self.dist.all_reduce(z)  # every rank holds every user's codes
        if self.cfg.mode == "joint" and self.joint_opt is None:
            # the same tensors are kept across epochs, so the optimiser state stays valid
            leaves = [st.codebooks[p.name].requires_grad_(True) for p in self.cfg.profiles]
            self.joint_opt = torch.optim.Adam(leaves, lr=self.cfg.lr_shared)

    def _reseed(self, cb, dead, X, sqd, g):
        """Dead codes take the globally worst-fitted users: each rank offers its own worst few."""
        if self.dist.world == 1:
            return reseed_dead(cb, dead, X, sqd, g)
        n = int(dead.sum())
        top = torch.argsort(sqd, descending=True, stable=True)[:n]
        parts = self.dist.gather((self.users[top], X[top], sqd[top]))
        u = torch.cat([p[0] for p in parts])
        order = torch.argsort(u)
        x_all, d_all = torch.cat([p[1] for p in parts])[order], torch.cat([p[2] for p in parts])[order]
        return reseed_dead(cb, dead, x_all, d_all, g)

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

    # ------------------------------------------------------------------ evaluation
    def _pick_eval_users(self) -> torch.Tensor:
        """This rank's evaluation users (a seeded subset when ``eval_users`` caps the total)."""
        users = [u for u in sorted(self.corpus.heldout) if u in self.corpus.train]
        cap = self.cfg.eval_users and max(1, self.cfg.eval_users // self.dist.world)
        if cap and len(users) > cap:
            g = torch.Generator().manual_seed(self.cfg.seed + 7)
            pick = torch.randperm(len(users), generator=g)[:cap]
            users = sorted(users[i] for i in pick.tolist())
        return torch.tensor(users, dtype=torch.long)

    def eval_variants(self, users: torch.Tensor) -> dict[str, torch.Tensor]:
        """Soft tokens [U, m, n, H] per evaluation variant: own, shuffled, mean, codeword, own_x{a}."""
        prof, st = self.profiles, self.state
        base = prof.base(self.pop_rows)
        centre = None if prof.residual else prof.population(self.pop_rows)
        personal = prof.personal(self.rows(users), centre)
        perm = _derangement(len(users), torch.Generator().manual_seed(self.cfg.seed + 11)) if len(users) > 1 \
            else torch.zeros(len(users), dtype=torch.long)
        variants = {
            "own": base + personal,
            "shuffled": base + personal[perm],
            "mean": (base + st.mu).expand_as(personal),
            "codeword": base + self.code_targets(users),
        }
        for a in self.cfg.eval_scales:
            variants[f"own_x{a:g}"] = base + st.mu + a * (personal - st.mu)
        return variants

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out NLL of the evaluation users' first validation-period windows under each variant (see
        userip.profile.evaluate), token-weighted and per user, with the selection/report halves, 95% bootstrap
        intervals and the captured fraction of the in-context ceiling.

        'mean' is the population prompt (base + the centre of everyone's personal part); 'shuffled' gives each
        user another user's tokens (within a rank's shard when sharded).
        """
        from userip.profile import evaluate as ev

        users = self.eval_users
        st, cfg = self.state, self.cfg
        n_eval = int(self.dist.all_reduce(torch.tensor([len(users)]))[0])
        if n_eval < 2 or st.mu is None:
            return {}
        local = ev.score_variants(self.scorer, self.corpus, users.tolist(), self.eval_variants(users),
                                  cfg.eval_windows, cfg.batch_users)
        sums = ev.UserSums.concat(self.dist.gather(local))
        ceiling = self.ceiling()
        names = list(sums.nll)
        tok = max(float(sums.tokens.sum()), 1.0)
        heldout = {k: float(sums.nll[k].sum() / tok) for k in names}
        per_user = {k: float(np.mean(sums.nll[k] / np.maximum(sums.tokens, 1))) for k in names}
        out = {
            "heldout": heldout,
            "heldout_user": per_user,
            "gap_own_vs_mean": heldout["mean"] - heldout["own"],
            "gap_own_vs_mean_user": per_user["mean"] - per_user["own"],
            "gap_own_vs_shuffled": heldout["shuffled"] - heldout["own"],
            "gap_own_vs_shuffled_user": per_user["shuffled"] - per_user["own"],
            "eval_users": n_eval,
            "eval_tokens": int(sums.tokens.sum()),
        }
        out.update(ev.summarise(sums, cfg.seed, cfg.bootstrap, cfg.eval_scales, ceiling))
        return out

    def ceiling(self) -> Any:
        """Per-user NLL sums of the in-context ceiling (computed once per fit: it does not depend on the
        soft tokens); None when the corpus has no history contexts."""
        from userip.profile import evaluate as ev

        if getattr(self, "_ceiling", None) is not None or not self.corpus.context:
            return getattr(self, "_ceiling", None)
        users = self.eval_users.tolist()
        # another user's history: a derangement over this rank's evaluation users, as 'shuffled' is
        perm = _derangement(len(users), torch.Generator().manual_seed(self.cfg.seed + 13)).tolist() \
            if len(users) > 1 else [0] * len(users)
        local = ev.score_ceiling(self.llm, self.corpus, users, [users[i] for i in perm], self.cfg.eval_windows,
                                 self.cfg.batch_users, self.cfg.ce_chunk)
        self._ceiling = ev.UserSums.concat(self.dist.gather(local))
        self.ceiling_metrics = ev.ceiling_summary(self._ceiling, self.cfg.seed, self.cfg.bootstrap)
        return self._ceiling

    def code_stats(self) -> dict[str, Any]:
        from sklearn.metrics import normalized_mutual_info_score

        st = self.state
        if st.z is None:
            return {}
        act = self.corpus.activity[self.all_users.numpy()]
        quart = np.searchsorted(np.quantile(act, [0.25, 0.5, 0.75]), act, side="right")
        out = {}
        for k, p in enumerate(self.cfg.profiles):
            z = st.z[self.all_users, k] - 1
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

    # ------------------------------------------------------------------ new users
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

    def load_fitted(self, profiles_dir: str | Path) -> None:
        """Load a fit's published state (shared prompt, codebooks, centre/scale, codes) for new-user inference."""
        from userip.quantize import load_codebooks

        profiles_dir = Path(profiles_dir)
        t = load_file(str(profiles_dir / "profiles.safetensors"))
        cbs = load_codebooks(profiles_dir / "codebooks.safetensors")
        st = self.state
        st.codebooks = {p.name: cbs[p.name].clone() for p in self.cfg.profiles}
        st.mu, st.scale = t["code_center"].clone(), t["code_scale"].clone()
        self.profiles.shared.copy_(t["shared"])
        n_old = t["theta"].shape[0]
        st.z = torch.zeros(self.corpus.n_users + 1, self.profiles.m, dtype=torch.long)
        fitted = (t["theta"].flatten(1).abs().sum(1) > 0).nonzero().flatten()
        if self.profiles.residual:
            self.pop_rows = torch.zeros(0, dtype=torch.long)
        else:  # the plain table's population prompt is the fitted users' mean theta
            self.profiles.table[self.rows(fitted)] = t["theta"][fitted]
            self.pop_rows = self.rows(fitted)
        if n_old > self.corpus.n_users + 1:
            raise ValueError("the fitted table is larger than this corpus")

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
        for p in self.cfg.profiles:
            if f"codebook.{p.name}" in snap:
                st.codebooks[p.name] = snap[f"codebook.{p.name}"].clone()
        if "z" in snap:
            st.z, st.mu, st.scale = snap["z"].clone(), snap["mu"].clone(), snap["scale"].clone()

    def extra_checkpoint(self) -> dict[str, torch.Tensor]:
        """Tensors an inference mode adds to each epoch checkpoint (optimiser state of its own parameters)."""
        return {}

    def load_extra_checkpoint(self, t: dict[str, torch.Tensor]) -> None:
        """Restore what ``extra_checkpoint`` saved."""

    def output_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors an inference mode adds to profiles.safetensors (e.g. the amortised encoder's map)."""
        return {}

    def _shard_name(self, epoch: int) -> str:
        return f"epoch{epoch:04d}.rank{self.dist.rank}-of-{self.dist.world}.safetensors"

    def _checkpoint(self) -> None:
        """Each rank writes its shard for this epoch; then rank 0 commits by pointing last.json at the epoch."""
        if self.out_dir is None:
            return
        ck = self.out_dir / "checkpoints"
        ck.mkdir(parents=True, exist_ok=True)
        st = self.state
        tensors = self._snapshot()
        tensors.update({f"user_opt.{k}": v for k, v in self.user_opt.state_dict().items()})
        tensors.update({f"shared_opt.{k}": v for k, v in self.shared_opt.state_dict().items()})
        tensors.update({f"best.{k}": v for k, v in self.best.items()})
        tensors.update(self.extra_checkpoint())
        if self.joint_opt is not None:
            for i, s in enumerate(self.joint_opt.state.values()):
                tensors.update({f"joint_opt.{i}.{k}": v for k, v in s.items()})
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        with atomic_path(ck / self._shard_name(st.epoch)) as tmp:
            save_file(tensors, str(tmp))
        self.dist.barrier()  # every shard of this epoch is on disk before the commit
        if self.dist.is_main:
            write_json(ck / "last.json", {
                "epoch": st.epoch, "world": self.dist.world, "metrics": st.metrics, "best_epoch": st.best_epoch,
                "best_nll": st.best_nll, "bad_epochs": st.bad_epochs, "config": self.cfg.to_dict(),
            })
        self.dist.barrier()
        for old in ck.glob(f"epoch*.rank{self.dist.rank}-of-{self.dist.world}.safetensors"):
            if old.name != self._shard_name(st.epoch):
                old.unlink(missing_ok=True)

    def _resume(self) -> None:
        if self.out_dir is None:
            return
        ck = self.out_dir / "checkpoints"
        if not (ck / "last.json").exists():
            return
        meta = read_json(ck / "last.json")
        saved = dict(meta["config"])
        now = self.cfg.to_dict()
        for key in ("epochs", "patience", "threads"):  # may change between a run and its continuation
            saved.pop(key, None)
            now.pop(key, None)
        shard = ck / self._shard_name(meta["epoch"])
        if saved != now or meta.get("world", 1) != self.dist.world or not shard.exists():
            log.warning("checkpoint in %s does not match this config or process count: starting afresh", ck)
            return
        t = load_file(str(shard))
        st = self.state
        st.epoch, st.metrics = meta["epoch"], meta["metrics"]
        st.best_epoch, st.best_nll, st.bad_epochs = meta["best_epoch"], meta["best_nll"], meta["bad_epochs"]
        self._restore(t)
        self.user_opt.load_state_dict({k: t[f"user_opt.{k}"] for k in ("exp_avg", "exp_avg_sq", "steps")})
        self.shared_opt.load_state_dict({k: t[f"shared_opt.{k}"] for k in ("exp_avg", "exp_avg_sq", "steps")})
        self.best = {k[len("best."):]: v for k, v in t.items() if k.startswith("best.")}
        self.load_extra_checkpoint(t)
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
        log.info("resumed from %s after epoch %d", ck, st.epoch)

    # ------------------------------------------------------------------ results
    def assignments(self) -> torch.Tensor:
        """1-based code per fitted user and profile [U+1, m] (0 for users not fitted)."""
        assert self.state.z is not None
        return self.state.z.clone()

    def theta_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta, personal) per user index [U+1, m, n, H], every rank's users; rows of users not fitted are 0."""
        prof = self.profiles
        n_rows = self.corpus.n_users + 1
        centre = None if prof.residual else prof.population(self.pop_rows)
        r = self.rows(self.users)
        personal = torch.zeros(n_rows, prof.m, prof.n, prof.hidden)
        personal[self.users] = prof.personal(r, centre)
        theta = torch.zeros_like(personal)
        theta[self.users] = prof.base(self.pop_rows) + personal[self.users]
        self.dist.all_reduce(personal)
        self.dist.all_reduce(theta)
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
        g = m.get("report", {}).get("gaps", {}).get("own_vs_mean", {})
        if "lo" in g:
            parts.append(f"own-vs-mean (report half) {g['token']:+.4f} [{g['lo']:+.4f}, {g['hi']:+.4f}]")
        else:
            parts.append(f"gap own-vs-mean {m['gap_own_vs_mean']:+.4f} (per user {m['gap_own_vs_mean_user']:+.4f})")
        if m.get("captured") is not None:
            parts.append(f"captured {m['captured']:.0%} (scaled x{m['personal_scale']:g}: "
                         f"{m['captured_calibrated']:.0%})")
    for name, c in m.get("codes", {}).items():
        parts.append(f"{name} ppl {c['perplexity']:.2f} nmi-act {c['nmi_activity']:.2f}")
    return " | ".join(parts)
