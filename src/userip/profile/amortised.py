"""Amortised inference: soft profiles read off the user's history by a shared map, trained by the likelihood.

    z_u          = (mean over the user's train windows of the frozen LLM's pooled state - population mean) / std
                   (``pca: N``: then its top N principal components, whitened)
    theta_{u,k}  = shared_k + A_k B_k z_u                      (rank r; A_k = 0 at init, so training starts
                                                                at the population prompt)

``shared``, ``A`` and ``B`` are trained together by the behaviour NLL of a window the encoder did **not** read:
``target: loo`` leaves the target window out of z_u, ``target: forecast`` reads only the windows before it
(the held-out task: the future from the past). Why amortised: the per-user E-step estimates ~576 numbers per
profile from one noisy window per Adam step and comes out as noise, while the same LLM reading the history in
context clearly predicts the user; a shared map pools what every user teaches about reading a history. A new
user costs one no-grad forward over their windows, no gradient step.

Codes, evaluation, checkpoints and outputs are the EM fitter's: after each epoch every user's personal part
``A B z_u`` is written into the residual table, which the M-step quantises as before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from userip.errors import UseripError
from userip.monitor import release_memory
from userip.profile.config import ProfileConfig
from userip.profile.corpus import Corpus
from userip.profile.evaluate import marks_tensor
from userip.profile.fitter import Fitter
from userip.profile.pooled import PooledStates
from userip.profile.student import HistoryStudent, ItemStates, fit_student, item_features
from userip.profile.template import make_batch
from userip.quantize import assign, prepare_for_codes


class HistoryMap(torch.nn.Module):
    """Per profile k, a rank-r map from the standardised history state z [d] to its soft tokens [n_k, H]."""

    def __init__(self, cfg: ProfileConfig, hidden: int, generator: torch.Generator, in_dim: int | None = None) -> None:
        super().__init__()
        self.n = max(p.n_tokens for p in cfg.profiles)
        self.n_tokens = [p.n_tokens for p in cfg.profiles]
        self.hidden = hidden
        r, d = cfg.rank, in_dim or hidden
        self.A = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(n_k * hidden, r)) for n_k in self.n_tokens])
        self.B = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(r, d, generator=generator) / d**0.5) for _ in self.n_tokens])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = z.new_zeros(len(z), len(self.n_tokens), self.n, self.hidden)
        for k, n_k in enumerate(self.n_tokens):
            out[:, k, :n_k] = (z @ self.B[k].T @ self.A[k].T).view(len(z), n_k, self.hidden)
        return out


class AmortisedFitter(Fitter):
    """Fits the shared prompt and the history map; personal parts (and so codes) follow from the history."""

    recluster = True  # nothing trains against the codes: each M-step quantises that epoch's personal parts afresh

    def __init__(self, llm, cfg: ProfileConfig, corpus: Corpus, out_dir: Path | None = None,
                 states: PooledStates | None = None, progress: bool = False, read_history: bool = True) -> None:
        super().__init__(llm, cfg, corpus, out_dir)
        if self.dist.world > 1:
            raise UseripError("inference 'amortised' runs in one process (the sharded fit is for 'em')")
        self.pooled = states or PooledStates(llm, cfg.pool, cfg.pool_batch, layer=cfg.pool_layer)
        # the encoder reads (and trains on) each user's most recent windows: bounds a new user's cost
        cap = cfg.history_windows
        self.windows = {u: (w[-cap:] if cap else w) for u, w in corpus.train.items()}
        marks = {u: (m[-cap:] if cap else m) for u, m in corpus.train_marks.items()}
        if (cfg.pool == "rating" or cfg.rating_weight != 1.0) and not marks:
            raise UseripError("profile.pool 'rating' and rating_weight need behaviour: rated (the text must hold "
                              "the ratings)")
        self.rating_marks = marks if cfg.rating_weight != 1.0 else None
        self.marks = marks
        # read_history False: a fitted encoder that only infers with its student never reads the windows with
        # the LLM (the standardisation below is then the loaded fit's)
        self.states = self.pooled.get(self.windows, progress=progress, marks=marks) if read_history else {}
        bos = int(llm.tokenizer.bos_token_id is not None)
        self.pool_tokens = sum(len(w) + bos for ws in self.windows.values() for w in ws)
        self.sums = {u: s.sum(0) for u, s in self.states.items()}
        if self.states:
            means = torch.stack([self.sums[u] / len(self.states[u]) for u in sorted(self.states)])
            self.h_mean = means.mean(0)
            self.h_std = means.std(0).clamp(min=1e-6) if len(means) > 1 else torch.ones_like(self.h_mean)
        else:
            means = torch.zeros(0, llm.hidden_size)
            self.h_mean, self.h_std = torch.zeros(llm.hidden_size), torch.ones(llm.hidden_size)
        self.basis = self._pca_basis((means - self.h_mean) / self.h_std) if cfg.pca else None
        g = torch.Generator().manual_seed(cfg.seed + 5)
        # cross-fitting: K maps, map k trained on the users outside fold k, a user's profile read by the map of
        # their own fold, which never trained on them (so no user's profile is memorised from their own items)
        self.maps = torch.nn.ModuleList([HistoryMap(cfg, llm.hidden_size, g, cfg.pca or None)
                                         for _ in range(max(1, cfg.cross_fit))])
        self.fold = torch.zeros(corpus.n_users + 1, dtype=torch.long)
        if len(self.maps) > 1:
            perm = torch.randperm(len(self.users), generator=torch.Generator().manual_seed(cfg.seed + 17))
            self.fold[self.users[perm]] = torch.arange(len(self.users)) % len(self.maps)
        self.shared_param = torch.nn.Parameter(self.profiles.shared)  # shares storage with profiles.shared
        self.opt = torch.optim.Adam([{"params": [self.shared_param], "lr": cfg.lr_shared},
                                     {"params": list(self.maps.parameters()), "lr": cfg.lr_map}])
        self.profiles.table.zero_()
        self.fitted_fold: torch.Tensor | None = None  # a loaded fit's fold per user_idx (load_fitted)
        self.student: HistoryStudent | None = None  # the cheap encoder of new users (userip.profile.student)

    @property
    def map(self) -> HistoryMap:
        return self.maps[0]

    def personal(self, z: torch.Tensor, maps: torch.Tensor | None) -> torch.Tensor:
        """Personal parts [B, m, n, H] of rows ``z`` by map ``maps[i]`` each (None, or -1 for a row: the average
        of the maps, for users outside every fold)."""
        if maps is None:
            maps = torch.full((len(z),), -1, dtype=torch.long)
        out = None
        for k in maps.unique().tolist():
            rows = (maps == k).nonzero().flatten()
            part = (torch.stack([m(z[rows]) for m in self.maps]).mean(0) if k < 0 else self.maps[k](z[rows]))
            out = part.new_zeros(len(z), *part.shape[1:]) if out is None else out
            out = out.index_copy(0, rows, part)
        return out

    def _train_maps(self, users: list[int], g: torch.Generator) -> torch.Tensor:
        """Which map a training row updates: one that does not read the user's own fold."""
        K = len(self.maps)
        if K == 1:
            return torch.zeros(len(users), dtype=torch.long)
        shift = 1 + torch.randint(K - 1, (len(users),), generator=g)
        return (self.fold[torch.tensor(users)] + shift) % K

    # ------------------------------------------------------------------ features
    def _pca_basis(self, z: torch.Tensor) -> torch.Tensor:
        """[d, H]: the top ``pca`` principal directions of the users' z, scaled so each component has unit
        variance; zeros (a placeholder a loaded fit overwrites) when there are too few users to estimate them."""
        d = self.cfg.pca
        if len(z) <= d:
            return torch.zeros(d, z.shape[1])
        _, S, Vt = torch.linalg.svd(z - z.mean(0), full_matrices=False)
        return Vt[:d] / (S[:d, None] / (len(z) - 1) ** 0.5).clamp(min=1e-6)

    def before_fit(self) -> None:
        if self.basis is not None and not self.basis.any():
            raise UseripError(f"profile.pca {self.cfg.pca} needs more than {self.cfg.pca} users with train "
                              f"windows to fit its components (got {len(self.states)}); lower it or set 0")

    def standardise(self, h: torch.Tensor) -> torch.Tensor:
        z = (h - self.h_mean) / self.h_std
        return z if self.basis is None else z @ self.basis.T

    def features(self, users: list[int], target: list[int] | None = None) -> torch.Tensor:
        """z for ``users`` from all their windows, or without ``target[i]`` (loo) / from the windows before it
        (forecast); a user with nothing left to read gets the population (z = 0)."""
        out = torch.zeros(len(users), self.cfg.pca or self.h_mean.numel())
        for i, u in enumerate(users):
            st = self.states[u]
            if target is None:
                h, n = self.sums[u], len(st)
            elif self.cfg.target == "forecast":
                h, n = st[: target[i]].sum(0), target[i]
            else:
                h, n = self.sums[u] - st[target[i]], len(st) - 1
            if n > 0:
                out[i] = self.standardise(h / n)
        return out

    def _targets(self, users: list[int], g: torch.Generator) -> list[int]:
        """A random target window per user (forecast: one with at least one window before it, where possible)."""
        out = []
        for u in users:
            n = len(self.windows[u])
            lo = 1 if (self.cfg.target == "forecast" and n > 1) else 0
            out.append(lo + int(torch.randint(n - lo, (1,), generator=g)))
        return out

    # ------------------------------------------------------------------ training
    def train_epoch(self, g: torch.Generator, epochs: int, progress: bool) -> tuple[float, float]:
        cfg = self.cfg
        train = self.users
        if cfg.unseen_eval_users:  # the map and prompt never train on the evaluation users' windows
            train = train[~torch.isin(train, self.eval_users)]
        order = train[torch.randperm(len(train), generator=g)].tolist()
        B = cfg.batch_users
        batches = [order[s : s + B] for s in range(0, len(order), B)]
        steps = cfg.steps_per_epoch or len(batches)
        nll_sum, tok_sum = 0.0, 0.0
        bar = tqdm(range(steps), desc=f"epoch {self.state.epoch + 1}/{epochs}", disable=not progress, leave=False)
        for b in bar:
            users = batches[b % len(batches)]
            target = self._targets(users, g)
            z = self.features(users, target)
            which = self._train_maps(users, g)
            self.opt.zero_grad(set_to_none=True)
            mb = cfg.micro_batch or len(users)
            for s in range(0, len(users), mb):
                theta = self.shared_param + self.personal(z[s : s + mb], which[s : s + mb])
                sums, counts, loss = self.row_loss(theta, users[s : s + mb], target[s : s + mb])
                (loss.sum() / len(users)).backward()
                nll_sum += float(sums.detach().sum())
                tok_sum += float(counts.sum())
            self.opt.step()
            bar.set_postfix(nll=f"{nll_sum / max(tok_sum, 1):.3f}")
            if b % 8 == 7:
                release_memory()
        self.materialise(self.users)
        return nll_sum, tok_sum

    def row_loss(self, theta: torch.Tensor, users: list[int], target: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(NLL sums, token counts, training loss) per row for ``users``' target windows: the mean NLL per
        token, with rating tokens counted ``rating_weight`` times when it is not 1."""
        rows = [self.windows[u][t] for u, t in zip(users, target, strict=True)]
        batch = make_batch(rows)
        self.count_tokens(batch)
        if self.rating_marks is None:
            sums, counts = self.scorer.row_nll(theta, batch)
            return sums, counts, sums / counts
        marks = marks_tensor([self.rating_marks[u][t] for u, t in zip(users, target, strict=True)])
        sums, counts, msums, mcounts = self.scorer.row_nll_marked(theta, batch, marks)
        w = self.cfg.rating_weight - 1.0
        return sums, counts, (sums + w * msums) / (counts + w * mcounts.to(counts.device))

    @torch.no_grad()
    def materialise(self, users: torch.Tensor, z: torch.Tensor | None = None) -> None:
        """Write ``users``' personal parts (their full history, read by their fold's map; fold -1: by the
        average of the maps) into the residual table; ``z``: their encoder inputs, when not the pooled states'."""
        for s in range(0, len(users), 1024):
            chunk = users[s : s + 1024]
            maps = self.fold[chunk]
            zc = self.features(chunk.tolist()) if z is None else z[s : s + 1024]
            self.profiles.table[self.rows(chunk)] = self.personal(zc, maps)

    @torch.no_grad()
    def codes_of(self, users: torch.Tensor) -> torch.Tensor:
        """[B, m] 0-based codes of ``users``' personal parts as now in the table (nearest codeword)."""
        st = self.state
        personal = self.profiles.personal(self.rows(users))
        out = torch.zeros(len(users), len(self.cfg.profiles), dtype=torch.long)
        for k, p in enumerate(self.cfg.profiles):
            x = prepare_for_codes(personal[:, k, : p.n_tokens].flatten(1), center=st.mu[k, : p.n_tokens].flatten())
            out[:, k], _ = assign(x, st.codebooks[p.name])
        return out

    # ------------------------------------------------------------------ the student
    def item_features(self, users: list[int], cache: bool = True, progress: bool = False) -> torch.Tensor:
        """[B, H] the student's input for ``users``: their windows' interactions, each read on its own."""
        states = ItemStates(self.llm, cache="default" if cache else None)
        feats = item_features(self.llm, {u: self.windows.get(u, []) for u in users}, states, progress)
        return torch.stack([feats[u] for u in users]) if users else torch.zeros(0, self.llm.hidden_size)

    @torch.no_grad()
    def fit_student(self, progress: bool = False) -> dict:
        """Distil the encoder's input into the item-by-item student (``profile.student``) on the fitted users,
        one student per cross-fitting fold as the maps; returns its metrics, with how often each user's IDs by
        the student that never saw them equal their fitted IDs (Cohen's kappa)."""
        from sklearn.metrics import cohen_kappa_score

        users = sorted(self.states)
        x = self.item_features(users, progress=progress)
        z = torch.cat([self.features(users[s : s + 1024]) for s in range(0, len(users), 1024)])
        latents = [B.detach() for m in self.maps for B in m.B]
        groups = self.fold[torch.tensor(users)].clamp(min=0)
        student, oof, metrics = fit_student(x, z, latents, groups, seed=self.cfg.seed)
        ut = torch.tensor(users)
        self.materialise(ut)
        teacher = self.codes_of(ut)
        self.materialise(ut, oof)
        pupil = self.codes_of(ut)
        self.materialise(ut)  # the table holds the fitted encoder's parts again
        metrics["oof_id_agreement"] = {}
        for k, p in enumerate(self.cfg.profiles):
            a, b = teacher[:, k].numpy(), pupil[:, k].numpy()
            metrics["oof_id_agreement"][p.name] = {"agreement": float((a == b).mean()),
                                                   "kappa": float(cohen_kappa_score(a, b))}
        metrics["users"] = len(users)
        self.student = student
        return metrics

    @torch.no_grad()
    def scale_map(self, a: float) -> None:
        for m in self.maps:
            for A in m.A:
                A.mul_(a)

    # ------------------------------------------------------------------ state
    def map_state(self) -> dict[str, torch.Tensor]:
        """The trained encoder: map weights and the history standardisation (saved with the profiles)."""
        out = {f"map.{k}": v.detach().clone() for k, v in self.maps.state_dict().items()}
        out.update({"map.h_mean": self.h_mean.clone(), "map.h_std": self.h_std.clone()})
        if self.basis is not None:
            out["map.basis"] = self.basis.clone()
        return out

    def load_map_state(self, t: dict[str, torch.Tensor]) -> None:
        self.maps.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("map.") and k[4].isdigit()})
        self.h_mean, self.h_std = t["map.h_mean"].clone(), t["map.h_std"].clone()
        if "map.basis" in t:
            self.basis = t["map.basis"].clone()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        snap = super()._snapshot()
        snap.update(self.map_state())
        return snap

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        super()._restore(snap)
        if any(k.startswith("map.") for k in snap):
            self.load_map_state(snap)

    def extra_checkpoint(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, p in enumerate([self.shared_param, *self.maps.parameters()]):
            s = self.opt.state.get(p, {})
            out.update({f"opt.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).clone() for k, v in s.items()})
        return out

    def load_extra_checkpoint(self, t: dict[str, torch.Tensor]) -> None:
        for i, p in enumerate([self.shared_param, *self.maps.parameters()]):
            s = {k.split(".", 2)[2]: v.clone() for k, v in t.items() if k.startswith(f"opt.{i}.")}
            if s:
                self.opt.state[p] = s

    def output_tensors(self) -> dict[str, torch.Tensor]:
        out = {k: v.contiguous() for k, v in self.map_state().items()}
        if self.student is not None:
            out.update({k: v.contiguous() for k, v in self.student.to_tensors().items()})
        if len(self.maps) > 1:  # which map read each fitted user (by user_idx): a refresh reads them the same way
            out["fold"] = self.fold.clone()
        return out

    def load_fitted(self, profiles_dir: str | Path) -> None:
        from safetensors.torch import load_file

        super().load_fitted(profiles_dir)
        t = load_file(str(Path(profiles_dir) / "profiles.safetensors"))
        self.load_map_state(t)
        self.fitted_fold = t["fold"].clone() if "fold" in t else None
        self.student = HistoryStudent.from_tensors(t)

    # ------------------------------------------------------------------ new users
    @torch.no_grad()
    def infer(self, users: torch.Tensor, progress: bool = False, fitted_rows: torch.Tensor | None = None,
              encoder: str = "auto", item_cache: bool = True) -> torch.Tensor:
        """Codes for ``users`` (rows of this corpus) from their history, with no gradient step.

        ``encoder``: ``llm`` reads the user's windows in one no-grad pass, as the fit read them; ``student``
        reads each interaction on its own through the fit's distilled student (``profile.student``; cached
        interactions cost nothing: ``item_cache``); ``auto``: the student where the fit has one.

        ``fitted_rows[i]``: user i's user_idx in the loaded fit (0: not in it). A fitted user is read by the map
        of their cross-fitting fold, the function that gave their fitted IDs, so an ``llm`` refresh from the
        same history reproduces them and one from a longer history moves them only as far as the history moved;
        a new user is read by the average of the maps."""
        st = self.state
        if st.z is None or not st.codebooks:
            raise ValueError("infer needs a fitted model (codebooks)")
        if encoder not in ("auto", "llm", "student"):
            raise UseripError(f"encoder '{encoder}' is not one of auto, llm, student")
        if encoder == "student" and self.student is None:
            raise UseripError("encoder 'student': this fit has no student (fit with profile.student: item, or "
                              "add one with `userip profile distil`)")
        users = torch.as_tensor(users, dtype=torch.long)
        folds = torch.full((len(users),), -1, dtype=torch.long)
        known = self.fitted_fold
        if fitted_rows is not None and known is not None:
            fitted_rows = torch.as_tensor(fitted_rows, dtype=torch.long)
            ok = (fitted_rows > 0) & (fitted_rows < len(known))
            folds[ok] = known[fitted_rows[ok]]
        self.fold[users] = folds
        if self.student is not None and encoder != "llm":
            x = self.item_features(users.tolist(), cache=item_cache, progress=progress)
            self.materialise(users, self.student.predict(x, folds))
        else:
            self.read_states(users.tolist(), progress)
            self.materialise(users)
        st.z[users] = self.codes_of(users) + 1
        return st.z[users].clone()

    def read_states(self, users: list[int], progress: bool = False) -> None:
        """Pool the windows of ``users`` not read yet (a fitter built with read_history False)."""
        todo = [u for u in users if u not in self.states]
        if todo:
            marks = {u: self.marks[u] for u in todo if u in self.marks} or None
            got = self.pooled.get({u: self.windows[u] for u in todo}, progress=progress, marks=marks)
            self.states.update(got)
            self.sums.update({u: s.sum(0) for u, s in got.items()})
