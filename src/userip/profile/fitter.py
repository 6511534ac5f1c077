"""The loop every inference mode shares, readable top to bottom (nanoGPT-style).

    for each epoch:
        train_epoch        the inference mode's own training (per-user E-step, or the amortised map)
        M-step             per profile, closed-form k-means steps on the centred, L2-normalised personal part of
                           every user (k-means++ init, dead codes re-seeded from the worst-fitted users), and the
                           personal part's centre mu and RMS scale s (userip.profile.codes)
        evaluate           held-out NLL own / shuffled / mean / codeword (+ scaled own) with 95% intervals on the
                           report half, and the in-context ceiling (userip.profile.evaluate)
        keep the best epoch (chosen on the selection half), checkpoint (userip.profile.checkpoint)

Compute is counted in the unit issue 10 compares inference modes at: LLM tokens processed by training (each
row's prompt, soft tokens included, plus its behaviour tokens; forward and backward), per training phase, beside
the no-grad tokens of pooling history states (``metrics["compute"]``, cumulative in every epoch's metrics).
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
from safetensors.torch import load_file
from tqdm.auto import tqdm

from userip.errors import UseripError
from userip.monitor import rss_mb
from userip.profile.checkpoint import resume, save_checkpoint
from userip.profile.codes import CodesMixin
from userip.profile.config import ProfileConfig
from userip.profile.corpus import Corpus
from userip.profile.dist import Dist
from userip.profile.model import Scorer, SoftProfiles, text_init_embeddings
from userip.profile.template import Batch

log = logging.getLogger(__name__)


@dataclass
class EMState:
    """Everything a resumed run needs besides the config: saved to checkpoints/ after each epoch."""

    epoch: int = 0  # epochs completed
    codebooks: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [K, n*H] (normalised space)
    z: torch.Tensor | None = None  # [U+1, m] 1-based codes, 0 = none
    mu: torch.Tensor | None = None  # [m, n, H] centre of the personal part
    scale: torch.Tensor | None = None  # [m] RMS spread of the personal part (the prior's scale)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)  # the best epoch, fully evaluated (set by fit)
    best_epoch: int = 0
    best_nll: float = math.inf
    bad_epochs: int = 0


class Fitter(CodesMixin):
    """What every inference mode shares: soft profiles, the epoch loop, the closed-form M-step that quantises the
    personal parts into codes, held-out evaluation, checkpoints and outputs. A mode (``em.ProfileFitter``,
    ``amortised.AmortisedFitter``) provides ``train_epoch`` and ``infer``. Fits the users of ``corpus`` (this
    rank's shard when run under torch.distributed).
    """

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
        self.state = EMState()
        self.eval_users = self._pick_eval_users()
        self.pop_rows = self.rows(self.users)  # rows whose mean is the plain table's population prompt
        self.best: dict[str, torch.Tensor] = {}
        self.progress = False
        self.phases: tuple[str, ...] = (cfg.inference,)  # training phases whose tokens are counted apart
        self.train_tokens: dict[str, int] = {}  # this rank's training tokens per phase
        self.pool_tokens = 0  # no-grad tokens of pooling history states (amortised modes)

    def rows(self, users: torch.Tensor) -> torch.Tensor:
        return self.row_of[users]

    # ------------------------------------------------------------------ main loop
    def fit(self, epochs: int | None = None, progress: bool = True) -> EMState:
        cfg, st = self.cfg, self.state
        epochs = epochs or cfg.epochs
        progress = progress and self.dist.is_main
        self.progress = progress
        if resume(self) and self.dist.is_main and st.metrics:
            # the counts before the kill, once (rank 0): compute() sums the ranks
            self.train_tokens = dict(st.metrics[-1].get("compute", {}).get("train_tokens_by_phase", {}))
        self.before_fit()
        while st.epoch < epochs and st.bad_epochs < cfg.patience:
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.epoch)
            nll_sum, tok_sum = self.train_epoch(g, epochs, progress)
            self.m_step(g, iters=cfg.kmeans_iters if cfg.mode == "em" else 0)  # joint: refresh for reporting
            st.epoch += 1
            totals = self.dist.all_reduce(torch.tensor([nll_sum, tok_sum], dtype=torch.float64))
            m = {"epoch": st.epoch, "train_nll": float(totals[0] / max(float(totals[1]), 1.0))}
            m.update(self.evaluate(full=cfg.eval_each_epoch == "full"))
            m.update(self.code_stats())
            m["wall_s"] = time.perf_counter() - t0
            m["rss_mb"] = rss_mb()
            m["compute"] = self.compute()
            m.update(self.epoch_metrics())
            st.metrics.append(m)
            # select on the selection half of the evaluation users (reported figures come from the other half):
            # own at the scale this epoch would publish
            score = self._selection_score(m)
            if score < st.best_nll - 1e-6:
                st.best_nll, st.best_epoch, st.bad_epochs = score, st.epoch, 0
                self.best = self._snapshot()
            else:
                st.bad_epochs += 1
            if progress:
                log.info(_epoch_line(m))
                tqdm.write(_epoch_line(m))
            save_checkpoint(self)
        if self.best:
            self._restore(self.best)
        if st.metrics:  # the reported evaluation: every variant, the report half, the ceiling, at the best epoch
            best = st.metrics[st.best_epoch - 1] if st.best_epoch else st.metrics[-1]
            applied = self._published_scale(best)
            if applied != 1.0:
                self.apply_personal_scale(applied)
            st.final = {**best, **(self.evaluate(full=True) if cfg.eval_each_epoch != "full" or applied != 1.0
                                   else {}), "applied_scale": applied}
            if progress:
                tqdm.write("best epoch, full evaluation: " + _epoch_line(st.final))
        return st

    # ------------------------------------------------------------------ the published personal-part scale
    def _published_scale(self, m: dict[str, Any]) -> float:
        """The scale an epoch's profiles would be published at: the selection half's choice (apply_scale)."""
        from userip.profile import evaluate as ev

        sel = m.get("select", {}).get("heldout") or m.get("heldout")
        if not (sel and self.cfg.apply_scale and self.profiles.residual):
            return 1.0
        return ev.pick_scale(sel, self.cfg.eval_scales)

    def _selection_score(self, m: dict[str, Any]) -> float:
        """The epoch's held-out NLL on the selection half at the scale it would be published at."""
        from userip.profile import evaluate as ev

        sel = m.get("select", {}).get("heldout") or m.get("heldout")
        if not sel:
            return m["train_nll"]  # no held-out users
        return sel[ev.scaled_own(self._published_scale(m))]

    @torch.no_grad()
    def apply_personal_scale(self, a: float) -> None:
        """Publish ``own_x{a}``: every user's personal part moved toward the population centre mu by ``a``.

        theta_u = shared + delta_u becomes (shared + (1 - a) mu) + a delta_u = shared + mu + a (delta_u - mu),
        exactly the variant the selection half chose, so the population prompt (shared + mu) is unchanged.
        Codebooks live in the normalised space of the centred personal parts, so codes and IDs do not change;
        mu and the RMS scale follow. Modes with a map (amortised, hybrid) scale it too (``scale_map``), so new
        users get the same scale."""
        st, prof = self.state, self.profiles
        if not prof.residual or st.mu is None:
            raise UseripError("the personal-part scale applies to the residual table after an M-step")
        prof.shared += (1.0 - a) * st.mu  # in place: an inference mode's optimiser may hold this storage
        r = self.rows(self.users)
        prof.table[r] = a * prof.table[r]
        st.mu, st.scale = a * st.mu, a * st.scale
        self.scale_map(a)

    def scale_map(self, a: float) -> None:
        """Scale what produces a new user's personal part (amortised: the map's output layer)."""

    # ------------------------------------------------------------------ what an inference mode provides
    def train_epoch(self, g: torch.Generator, epochs: int, progress: bool) -> tuple[float, float]:
        """One epoch of training; must leave every user's personal part in ``profiles.table`` (which the
        M-step quantises and evaluation reads). Returns (train NLL sum, token count)."""
        raise NotImplementedError

    def infer(self, users: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """1-based codes [len(users), m] for users not in the fit (rows of this corpus), all else frozen."""
        raise NotImplementedError

    def before_fit(self) -> None:
        """Called once after a resume, before the first epoch."""

    def after_m_step(self) -> None:
        """Called at the end of every M-step."""

    def extra_checkpoint(self) -> dict[str, torch.Tensor]:
        """Tensors an inference mode adds to each epoch checkpoint (its optimiser state)."""
        return {}

    def load_extra_checkpoint(self, t: dict[str, torch.Tensor]) -> None:
        """Restore what ``extra_checkpoint`` saved."""

    def output_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors an inference mode adds to profiles.safetensors (e.g. the amortised encoder's map)."""
        return {}

    def epoch_metrics(self) -> dict[str, Any]:
        """What an inference mode adds to each epoch's metrics."""
        return {}

    def phase(self) -> str:
        """The training phase (one of ``phases``) whose tokens a training batch counts under now."""
        return self.phases[0]

    # ------------------------------------------------------------------ compute accounting
    def count_tokens(self, batch: Batch) -> None:
        """Count a training batch's LLM tokens: every row's prompt (template and soft tokens) and behaviour."""
        n = batch.size * self.scorer.layout.prefix_len + int(batch.lengths.sum())
        self.train_tokens[self.phase()] = self.train_tokens.get(self.phase(), 0) + n

    def compute(self) -> dict[str, Any]:
        """Training tokens so far (forward and backward), in all and per phase, summed over ranks, and the
        no-grad tokens of pooling history states (read once per fit, whether or not they came from the cache)."""
        counts = torch.tensor([self.train_tokens.get(p, 0) for p in self.phases], dtype=torch.float64)
        by_phase = dict(zip(self.phases, map(int, self.dist.all_reduce(counts)), strict=True))
        return {"train_tokens": sum(by_phase.values()), "train_tokens_by_phase": by_phase,
                "pool_tokens": self.pool_tokens}

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
        from userip.profile.evaluate import scaled_own

        for a in self.cfg.eval_scales:
            variants[scaled_own(a)] = base + st.mu + a * (personal - st.mu)
        return variants

    def select_users(self) -> torch.Tensor:
        """This rank's evaluation users that fall in the (global) selection half."""
        from userip.profile import evaluate as ev

        everyone = np.array(sorted(u for part in self.dist.gather(self.eval_users.tolist()) for u in part))
        select, _ = ev.halves(everyone, self.cfg.seed)
        chosen = set(everyone[select].tolist())
        return torch.tensor([u for u in self.eval_users.tolist() if u in chosen], dtype=torch.long)

    @torch.no_grad()
    def evaluate(self, full: bool = True) -> dict[str, Any]:
        """Held-out NLL of the evaluation users' first validation-period windows under each variant (see
        userip.profile.evaluate), token-weighted and per user, with the selection/report halves, 95% bootstrap
        intervals and the captured fraction of the in-context ceiling.

        ``full=False`` (the per-epoch check of ``eval_each_epoch: select``) scores only the selection half with
        own, mean and the scaled own: what choosing the best epoch needs, at a fraction of the cost.
        'mean' is the population prompt (base + the centre of everyone's personal part); 'shuffled' gives each
        user another user's tokens (within a rank's shard when sharded).
        """
        from userip.profile import evaluate as ev

        st, cfg = self.state, self.cfg
        users = self.eval_users if full else self.select_users()
        n_eval = int(self.dist.all_reduce(torch.tensor([len(users)]))[0])
        if n_eval < (2 if full else 1) or st.mu is None:
            return {}
        variants = self.eval_variants(users)
        if not full:
            variants = {k: v for k, v in variants.items() if k in ("own", "mean") or k.startswith("own_x")}
        local = ev.score_variants(self.scorer, self.corpus, users.tolist(), variants, cfg.eval_windows,
                                  cfg.batch_users, self.progress)
        sums = ev.UserSums.concat(self.dist.gather(local))
        names = list(sums.nll)
        tok = max(float(sums.tokens.sum()), 1.0)
        heldout = {k: float(sums.nll[k].sum() / tok) for k in names}
        per_user = {k: float(np.mean(sums.nll[k] / np.maximum(sums.tokens, 1))) for k in names}
        out = {
            "heldout": heldout,
            "heldout_user": per_user,
            "gap_own_vs_mean": heldout["mean"] - heldout["own"],
            "gap_own_vs_mean_user": per_user["mean"] - per_user["own"],
            "eval_users": n_eval,
            "eval_tokens": int(sums.tokens.sum()),
        }
        if not full:
            out["select"] = {"users": n_eval, "heldout": heldout}
            return out
        out["gap_own_vs_shuffled"] = heldout["shuffled"] - heldout["own"]
        out["gap_own_vs_shuffled_user"] = per_user["shuffled"] - per_user["own"]
        out.update(ev.summarise(sums, cfg.seed, cfg.bootstrap, cfg.eval_scales, self.ceiling()))
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
        other = [users[i] for i in perm]
        local = ev.cached_ceiling(self.llm, self.corpus, users, other, self.cfg.eval_windows,
                                  lambda: ev.score_ceiling(self.llm, self.corpus, users, other, self.cfg.eval_windows,
                                                           self.cfg.batch_users, self.cfg.ce_chunk, self.progress))
        self._ceiling = ev.UserSums.concat(self.dist.gather(local))
        self.ceiling_metrics = ev.ceiling_summary(self._ceiling, self.cfg.seed, self.cfg.bootstrap)
        return self._ceiling

    # ------------------------------------------------------------------ state
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


def _epoch_line(m: dict[str, Any]) -> str:
    h = m.get("heldout", {})
    parts = [f"epoch {m['epoch']}", f"train {m['train_nll']:.4f}"]
    if h:
        half = "" if "report" in m else " (selection half)"
        parts.append(f"held-out{half} " + " ".join(f"{k} {v:.4f}" for k, v in h.items()))
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
