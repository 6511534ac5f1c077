"""The M-step: every user's personal part quantised into their collaborative IDs, and the codes' statistics.

Per profile, closed-form k-means steps on the centred, L2-normalised personal part of every user (raw parts
cluster by how far they travelled, i.e. by activity; directions do not), k-means++ init, dead codes re-seeded
from the globally worst-fitted users; sums and counts are reduced over ranks, so the sharded fit gets the
codebooks a single process would. A mixin of :class:`userip.profile.fitter.Fitter`, which owns the state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from userip.quantize import (
    Codebook,
    assign,
    code_sums,
    kmeans_pp_init,
    perplexity,
    prepare_for_codes,
    reseed_dead,
    update_from_sums,
    usage,
)


class CodesMixin:
    """code_targets, m_step and code_stats over the Fitter's state (``self.state``, ``self.profiles``, ...)."""

    # True: every M-step clusters afresh (converged, best of ``kmeans_restarts``) instead of updating last
    # epoch's codebook: for modes where nothing is trained against the codes (amortised), so the codes are
    # simply the best quantiser of this epoch's personal parts
    recluster: bool = False

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
            if cb is None or self.recluster:  # on everyone's vectors, in global user order (the same on every rank)
                parts = self.dist.gather((self.users, X))
                all_u = torch.cat([u for u, _ in parts])
                all_x = torch.cat([x for _, x in parts])[torch.argsort(all_u)]
                if self.cfg.kmeans_restarts > 1 or self.recluster:  # converged, best of the restarts
                    book = Codebook(p.codebook_size)
                    book.fit(all_x, iters=100, generator=g, restarts=self.cfg.kmeans_restarts)
                    cb = book.codes
                else:
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
                # diagnostics: how far users sit from the population prompt (RMS over users of the L2 norm),
                # next to the prompt's own norm
                "personal_norm": float(st.scale[k]) if st.scale is not None else None,
                "base_norm": float(self.profiles.base(self.pop_rows)[k, : p.n_tokens].norm(dim=-1).mean()),
            }
        return {"codes": out}
