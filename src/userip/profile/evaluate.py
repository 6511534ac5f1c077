"""Held-out evaluation of soft profiles, and the in-context ceiling they are measured against.

Every evaluation user's first validation-period windows are scored by the frozen LM under several soft-token
variants: ``own`` (their profile), ``shuffled`` (another user's), ``mean`` (the population prompt), ``codeword``
(their quantised profile) and ``own_x{a}`` (the personal part scaled by a). The **ceiling** scores the same
target tokens with the user's own last N train interactions as plain text in front, vs another user's: what the
LLM can get out of the history when it reads it directly. ``personal_gain = history_other - history_own``;
a profile captures ``(mean - own) / personal_gain`` of it.

Evaluation users are split by a seeded permutation into a **selection** half (best epoch, personal-part scale)
and a **report** half (every reported gap, with a 95% bootstrap interval over users), so the figures a verdict
reads were not used to choose what is reported. Gaps are given per token and per item (tokens per item differ
between text modes), and, for rated text, split into rating tokens and title tokens: a gain that is only the
user's rating bias is real but the trivial part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from userip.profile.template import make_batch


@dataclass
class UserSums:
    """Per evaluation user: NLL sums per variant over all target tokens and over rating tokens, and counts."""

    users: np.ndarray
    nll: dict[str, np.ndarray] = field(default_factory=dict)
    rating_nll: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: np.ndarray | None = None
    rating_tokens: np.ndarray | None = None
    items: np.ndarray | None = None

    def add(self, names: list[str], owner: np.ndarray, sums: torch.Tensor, counts: torch.Tensor,
            msums: torch.Tensor, mcounts: torch.Tensor) -> None:
        """Accumulate a scored batch: rows ``j*n .. (j+1)*n`` hold variant ``names[j]`` of the ``n`` rows
        owned by users ``owner``."""
        n = len(owner)
        for j, k in enumerate(names):
            np.add.at(self.nll[k], owner, sums[j * n : (j + 1) * n].double().cpu().numpy())
            np.add.at(self.rating_nll[k], owner, msums[j * n : (j + 1) * n].double().cpu().numpy())
        np.add.at(self.tokens, owner, counts[:n].double().cpu().numpy())
        np.add.at(self.rating_tokens, owner, mcounts[:n].double().cpu().numpy())

    def subset(self, mask: np.ndarray) -> UserSums:
        return UserSums(self.users[mask], {k: v[mask] for k, v in self.nll.items()},
                        {k: v[mask] for k, v in self.rating_nll.items()}, self.tokens[mask],
                        self.rating_tokens[mask], self.items[mask])

    @staticmethod
    def concat(parts: list[UserSums]) -> UserSums:
        """Merge shards (e.g. one per rank), in global user order."""
        users = np.concatenate([p.users for p in parts])
        order = np.argsort(users, kind="stable")

        def cat(get):
            return np.concatenate([get(p) for p in parts])[order]

        keys = list(parts[0].nll)
        return UserSums(users[order], {k: cat(lambda p, k=k: p.nll[k]) for k in keys},
                        {k: cat(lambda p, k=k: p.rating_nll[k]) for k in keys}, cat(lambda p: p.tokens),
                        cat(lambda p: p.rating_tokens), cat(lambda p: p.items))


def heldout_rows(corpus, users: list[int], cap: int) -> tuple[list[list[int]], list[int], list[list[bool]]]:
    """The first ``cap`` held-out windows of each user: (token rows, owner position, rating-token marks)."""
    rows, owner, marks = [], [], []
    for i, u in enumerate(users):
        wins = corpus.heldout[u][:cap]
        mk = corpus.heldout_marks.get(u, [])
        for j, w in enumerate(wins):
            m = list(mk[j][: len(w)]) if j < len(mk) else []
            rows.append(w)
            owner.append(i)
            marks.append(m + [False] * (len(w) - len(m)))
    return rows, owner, marks


def marks_tensor(marks: list[list[bool]]) -> torch.Tensor:
    """[N, T] bool: ragged per-row token marks, right-padded with False."""
    T = max((len(m) for m in marks), default=0)
    out = torch.zeros(len(marks), T, dtype=torch.bool)
    for i, m in enumerate(marks):
        out[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return out


def _empty(users: list[int], names: list[str]) -> UserSums:
    n = len(users)
    return UserSums(np.asarray(users, dtype=np.int64), {k: np.zeros(n) for k in names},
                    {k: np.zeros(n) for k in names}, np.zeros(n), np.zeros(n), np.zeros(n))


def _items(corpus, users: list[int], cap: int) -> np.ndarray:
    return np.array([sum(corpus.heldout_items[u][:cap]) if u in corpus.heldout_items
                     else min(len(corpus.heldout[u]), cap) for u in users], dtype=np.float64)


@torch.no_grad()
def score_variants(scorer, corpus, users: list[int], variants: dict[str, torch.Tensor], cap: int,
                   batch_rows: int, progress: bool = False) -> UserSums:
    """Held-out NLL sums per user under each variant's soft tokens (``variants[name]`` is [U, m, n, H])."""
    names = list(variants)
    out = _empty(users, names)
    out.items = _items(corpus, users, cap)
    per = max(1, batch_rows // len(names))
    for s in tqdm(range(0, len(users), per), desc="held-out NLL", disable=not progress, leave=False):
        chunk = list(range(s, min(s + per, len(users))))
        rows, owner, marks = heldout_rows(corpus, [users[i] for i in chunk], cap)
        if not rows:
            continue
        owner_t = torch.tensor(owner) + s
        theta = torch.cat([variants[k][owner_t] for k in names])
        mk = marks_tensor(marks * len(names))
        out.add(names, owner_t.numpy(), *scorer.row_nll_marked(theta, make_batch(rows * len(names)), mk))
    return out


@torch.no_grad()
def score_ceiling(llm, corpus, users: list[int], other: list[int], cap: int, batch_rows: int,
                  ce_chunk: int = 1024, progress: bool = False) -> UserSums:
    """The same held-out target tokens after the user's own plain-text history vs ``other[i]``'s."""
    names = ["history_own", "history_other"]
    out = _empty(users, names)
    out.items = _items(corpus, users, cap)
    bos = [int(llm.tokenizer.bos_token_id)] if llm.tokenizer.bos_token_id is not None else []
    per = max(1, batch_rows // 2)
    for s in tqdm(range(0, len(users), per), desc="ceiling (history in context)", disable=not progress,
                  leave=False):
        chunk = list(range(s, min(s + per, len(users))))
        rows, owner, marks = heldout_rows(corpus, [users[i] for i in chunk], cap)
        if not rows:
            continue
        owner = [o + s for o in owner]
        seqs, starts = [], []
        for j in range(len(names)):
            for r, o in zip(rows, owner, strict=True):
                ctx = bos + corpus.context.get(users[o] if j == 0 else other[o], [])
                seqs.append(ctx + r)
                starts.append(len(ctx))
        out.add(names, np.asarray(owner), *context_nll(llm, seqs, starts, marks_tensor(marks * 2), ce_chunk))
    return out


def cached_ceiling(llm, corpus, users: list[int], other: list[int], cap: int, compute) -> UserSums:
    """The ceiling's per-user sums from the disk cache when the same LLM scored the same contexts and targets
    before (it does not depend on the profiles, so every fit on the same data and text shares it)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from userip.io import atomic_path
    from userip.paths import cache_dir
    from userip.profile.pooled import model_key

    h = hashlib.blake2b(model_key(llm, "ceiling").encode(), digest_size=16)
    for u, o in zip(users, other, strict=True):
        for part in (corpus.context.get(u, []), corpus.context.get(o, []), *corpus.heldout[u][:cap],
                     *[[int(x) for x in m] for m in corpus.heldout_marks.get(u, [])[:cap]]):
            h.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")
    path = cache_dir("ceiling") / f"{h.hexdigest()}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return UserSums(t["users"].numpy(), {k: t[f"nll.{k}"].numpy() for k in ("history_own", "history_other")},
                        {k: t[f"rating.{k}"].numpy() for k in ("history_own", "history_other")},
                        t["tokens"].numpy(), t["rating_tokens"].numpy(), t["items"].numpy())
    out = compute()
    tensors = {"users": torch.as_tensor(out.users), "tokens": torch.as_tensor(out.tokens),
               "rating_tokens": torch.as_tensor(out.rating_tokens), "items": torch.as_tensor(out.items)}
    tensors.update({f"nll.{k}": torch.as_tensor(v) for k, v in out.nll.items()})
    tensors.update({f"rating.{k}": torch.as_tensor(v) for k, v in out.rating_nll.items()})
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return out


def context_nll(llm, seqs: list[list[int]], starts: list[int], marks: torch.Tensor,
                ce_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLL sums of each sequence's tokens from ``starts[i]`` on (the context before it is only read), plain
    token ids, right-padded; also the sums over the ``marks``-ed target tokens. Returns (sums, counts,
    marked sums, marked counts), each [B]."""
    device = llm.device
    batch = make_batch(seqs)  # right-padded ids and lengths
    ids, lengths = batch.behaviour, batch.lengths
    attn = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    hidden = llm.model.model(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
    B = len(seqs)
    sums, counts = torch.zeros(B), torch.zeros(B)
    msums, mcounts = torch.zeros(B), torch.zeros(B)
    head = llm.model.get_output_embeddings()
    softcap = getattr(llm.model.config, "final_logit_softcapping", None)
    rows, cols, flags = [], [], []
    for i, (n, st) in enumerate(zip(lengths.tolist(), starts, strict=True)):
        pos = torch.arange(max(st, 1), n)
        rows.append(torch.full((len(pos),), i))
        cols.append(pos)
        t = pos - st
        flags.append(marks[i, t] if marks.shape[1] else torch.zeros(len(pos), dtype=torch.bool))
    r, c, f = torch.cat(rows), torch.cat(cols), torch.cat(flags)
    for s in range(0, len(r), ce_chunk):
        rr, cc = r[s : s + ce_chunk], c[s : s + ce_chunk]
        logits = head(hidden[rr.to(device), (cc - 1).to(device)]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        nll = torch.nn.functional.cross_entropy(logits, ids[rr, cc].to(device), reduction="none").cpu()
        sums.index_add_(0, rr, nll)
        counts.index_add_(0, rr, torch.ones(len(rr)))
        ff = f[s : s + ce_chunk]
        msums.index_add_(0, rr[ff], nll[ff])
        mcounts.index_add_(0, rr[ff], torch.ones(int(ff.sum())))
    return sums, counts, msums, mcounts


def halves(users: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection mask, report mask): a seeded half of the users each (the report half gets the odd one)."""
    g = np.random.default_rng(seed + 101)
    perm = g.permutation(len(users))
    select = np.zeros(len(users), dtype=bool)
    select[perm[: len(users) // 2]] = True
    return select, ~select


def paired_gap(s: UserSums, worse: str, better: str, n_boot: int, seed: int) -> dict[str, Any]:
    """``worse - better`` in nats, token-weighted over users (per token and per item), with a 95% bootstrap
    interval over users (per token), and the per-token gap on rating tokens and on the other tokens."""
    d = s.nll[worse] - s.nll[better]
    rd = s.rating_nll[worse] - s.rating_nll[better]
    tok, items, rtok = s.tokens, s.items, s.rating_tokens
    out: dict[str, Any] = {"users": int(len(d))}
    if len(d) == 0 or tok.sum() == 0:
        return out
    out["token"] = float(d.sum() / tok.sum())
    out["item"] = float(d.sum() / max(items.sum(), 1))
    if rtok.sum() > 0:
        out["rating_token"] = float(rd.sum() / rtok.sum())
        out["title_token"] = float((d - rd).sum() / max((tok - rtok).sum(), 1))
        out["rating_share"] = float(rd.sum() / d.sum()) if d.sum() != 0 else None
    if n_boot and len(d) > 1:
        g = np.random.default_rng(seed + 202)
        idx = g.integers(0, len(d), (n_boot, len(d)))
        boot = d[idx].sum(1) / tok[idx].sum(1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out["lo"], out["hi"] = float(lo), float(hi)
        out["verdict"] = "positive" if lo > 0 else "negative" if hi < 0 else "interval includes 0"
    return out


def per_token(s: UserSums) -> dict[str, float]:
    t = max(float(s.tokens.sum()), 1.0)
    return {k: float(v.sum() / t) for k, v in s.nll.items()}


def scaled_own(a: float) -> str:
    """The evaluation variant of own with the personal part scaled by ``a``: ``own`` at 1, else ``own_x{a}``."""
    return "own" if a == 1.0 else f"own_x{a:g}"


def pick_scale(heldout: dict[str, float], scales: list[float]) -> float:
    """The personal-part scale (1 or one of ``scales``) whose scaled own has the lowest held-out NLL in
    ``heldout`` (the selection half's per-token NLL per variant)."""
    return min([1.0, *scales], key=lambda a: heldout.get(scaled_own(a), np.inf))


def summarise(s: UserSums, seed: int, n_boot: int, scales: list[float],
              ceiling: UserSums | None = None) -> dict[str, Any]:
    """Epoch metrics from per-user sums: the selection half picks the personal-part scale; every gap is
    reported on the report half with its interval; the captured fraction of the ceiling where one is given."""
    select, report = halves(s.users, seed)
    sel, rep = s.subset(select), s.subset(report)
    sel_nll = per_token(sel)
    scale = pick_scale(sel_nll, scales)
    best = scaled_own(scale)
    gaps = {
        "own_vs_mean": paired_gap(rep, "mean", "own", n_boot, seed),
        "own_vs_shuffled": paired_gap(rep, "shuffled", "own", n_boot, seed),
        "codeword_vs_mean": paired_gap(rep, "mean", "codeword", n_boot, seed),
        "calibrated_vs_mean": paired_gap(rep, "mean", best, n_boot, seed),
    }
    out: dict[str, Any] = {
        "select": {"users": int(select.sum()), "heldout": sel_nll},
        "report": {"users": int(report.sum()), "heldout": per_token(rep), "gaps": gaps},
        "personal_scale": scale,
    }
    if ceiling is not None:
        c = ceiling.subset(report)
        gain = paired_gap(c, "history_other", "history_own", n_boot, seed)
        if gain.get("token"):
            out["captured"] = gaps["own_vs_mean"].get("token", 0.0) / gain["token"]
            out["captured_calibrated"] = gaps["calibrated_vs_mean"].get("token", 0.0) / gain["token"]
    return out


def ceiling_summary(c: UserSums, seed: int, n_boot: int) -> dict[str, Any]:
    """metrics.json's ``ceiling``: history_own / history_other per token and the personal gain (report half)."""
    _, report = halves(c.users, seed)
    rep = c.subset(report)
    nll = per_token(rep)
    gain = paired_gap(rep, "history_other", "history_own", n_boot, seed)
    return {"history_own": nll["history_own"], "history_other": nll["history_other"],
            "personal_gain": gain.get("token"), "personal_gain_item": gain.get("item"), "gain": gain,
            "users": int(report.sum())}
