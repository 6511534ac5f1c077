"""Soft user profiles and the frozen-LM likelihood of a behaviour window given them.

A user's soft tokens are ``shared[k] + delta[u, k]`` (residual table, default) or ``table[u, k]`` (plain, as
in the reference code). Why residual: in a calibration run ~95% of the held-out NLL drop of a plain table was a
drift every user shared, relearned once per user; the shared prompt learns it once from everyone, and the
residual (with a prior) only holds what is personal.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from userip.llm import LLM
from userip.profile.config import ProfileConfig
from userip.profile.template import (
    Batch,
    PromptLayout,
    accepts_mask_mapping,
    attention_mask,
    build_layout,
    layer_masks,
)


class SoftProfiles:
    """The trainable state: shared prompt [m, n, H] and a per-user table [rows, m, n, H] (fp32 masters).

    Row 0 is the unknown user. ``local_users`` (sorted global user indices) keeps only those users' rows,
    in that order from row 1 (a rank of a sharded fit); None keeps one row per user index.
    """

    def __init__(self, cfg: ProfileConfig, n_users: int, hidden: int, text_init: torch.Tensor | None,
                 generator: torch.Generator, local_users: torch.Tensor | None = None) -> None:
        m = len(cfg.profiles)
        n = max(p.n_tokens for p in cfg.profiles)
        self.cfg, self.m, self.n, self.hidden = cfg, m, n, hidden
        if cfg.init == "text" and text_init is not None:
            base = text_init.float().clone()
        else:
            base = (torch.rand(m, n, hidden, generator=generator) * 0.2 - 0.1)
        # draw the whole table, then keep the local rows: a user's init does not depend on the sharding
        if cfg.table == "residual":
            self.shared = base.clone()
            table = torch.randn(n_users + 1, m, n, hidden, generator=generator) * cfg.delta_init_std
        else:
            self.shared = torch.zeros(m, n, hidden)  # unused, kept so theta() has one formula
            if cfg.init == "uniform":
                table = torch.rand(n_users + 1, m, n, hidden, generator=generator) * 0.2 - 0.1
            else:
                table = base[None].repeat(n_users + 1, 1, 1, 1)
                table += torch.randn(table.shape, generator=generator) * cfg.delta_init_std
        if local_users is not None:
            table = table[torch.cat([torch.zeros(1, dtype=torch.long), local_users])]
        self.table = table
        self.table[0] = 0.0

    @property
    def residual(self) -> bool:
        return self.cfg.table == "residual"

    def population(self, rows: torch.Tensor) -> torch.Tensor:
        """Centre of the table over ``rows`` ([m, n, H])."""
        return self.table[rows].mean(0)

    def personal(self, rows: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
        """User-specific part: the residual (residual table) or theta minus the population (plain table)."""
        t = self.table[rows]
        if self.residual:
            return t
        return t - (self.population(rows) if centre is None else centre)

    def base(self, pop_rows: torch.Tensor) -> torch.Tensor:
        """The population prompt theta = base + personal is built on: shared, or the plain table's mean."""
        return self.shared if self.residual else self.population(pop_rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"shared": self.shared.clone(), "table": self.table.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shared.copy_(state["shared"])
        self.table.copy_(state["table"])


@torch.no_grad()
def text_init_embeddings(llm: LLM, cfg: ProfileConfig) -> torch.Tensor:
    """PEFT TEXT init: the frozen embeddings of each profile's name text, cycled to fill its soft tokens.

    Read through the embedding *module*, never its weight: the soft tokens enter as ``inputs_embeds``, i.e. in
    the module's output space, and Gemma's ``embed_tokens`` multiplies its rows by sqrt(hidden) (x25.3 at
    hidden 640), which the model skips when handed ``inputs_embeds``. Raw rows would start the soft tokens 25x
    too small. For Llama-style models the module output is the row itself.
    """
    embed = llm.input_embeddings()
    n = max(p.n_tokens for p in cfg.profiles)
    out = torch.zeros(len(cfg.profiles), n, llm.hidden_size)
    for k, p in enumerate(cfg.profiles):
        ids = llm.tokenizer(" " + (p.init_text or p.name), add_special_tokens=False)["input_ids"]
        vecs = embed(torch.tensor(ids, device=llm.device)).float().cpu()
        for j in range(n):
            out[k, j] = vecs[j % len(vecs)]
    return out


class SoftPrompt:
    """The prompt with soft-token slots, as ``inputs_embeds``: the one place it is assembled (fitting, the
    explanations' phrases, the benchmark's reference step).

    ``template`` (default ``cfg.template``) is laid out (`build_layout`) and its fixed text embedded once;
    calling it puts profile k's first ``n_tokens`` soft tokens of ``theta`` [B, m, n, H] in its slots and
    appends the embedded ``behaviour`` [B, T, H] when given: [B, P (+ T), H], differentiable in ``theta``.
    """

    def __init__(self, llm: LLM, cfg: ProfileConfig, template: str | None = None) -> None:
        self.layout: PromptLayout = build_layout(
            llm.tokenizer, template or cfg.template, cfg.names, [p.n_tokens for p in cfg.profiles]
        )
        with torch.no_grad():  # the frozen template pieces are embedded once
            self.prefix_emb = llm.input_embeddings()(self.layout.prefix_ids.to(llm.device)).to(llm.dtype)

    def __call__(self, theta: torch.Tensor, behaviour: torch.Tensor | None = None) -> torch.Tensor:
        prefix = self.prefix_emb[None].expand(theta.shape[0], -1, -1)
        pieces = []
        cursor = 0
        for k, pos in sorted(enumerate(self.layout.soft_positions), key=lambda kv: int(kv[1][0])):
            start, n_k = int(pos[0]), len(pos)
            pieces.append(prefix[:, cursor:start])
            pieces.append(theta[:, k, :n_k].to(device=prefix.device, dtype=prefix.dtype))
            cursor = start + n_k
        pieces.append(prefix[:, cursor:])
        if behaviour is not None:
            pieces.append(behaviour)
        return torch.cat(pieces, dim=1)


class Scorer:
    """Computes per-row behaviour NLL under given soft tokens with a frozen LM.

    Only behaviour tokens are scored, the LM head runs only at their positions, in chunks that are
    recomputed in backward, so logits memory stays at ``ce_chunk x vocab``.
    """

    def __init__(self, llm: LLM, cfg: ProfileConfig) -> None:
        self.llm, self.cfg = llm, cfg
        self.prompt = SoftPrompt(llm, cfg)
        self.layout: PromptLayout = self.prompt.layout
        self.device = llm.device
        self.dtype = llm.dtype
        self.lm_head = llm.model.get_output_embeddings()
        # logits are [ce_chunk, vocab] fp32, kept for backward: cap a chunk at 2^26 logits (256 MiB), which leaves
        # SmolLM2's 49k vocabulary at the configured 1024 and takes Gemma-3's 262k down to 256 rows per chunk.
        # Each token's NLL does not depend on the chunking, so this changes memory, never a loss.
        self.ce_chunk = max(1, min(cfg.ce_chunk, (1 << 26) // int(self.lm_head.weight.shape[0])))
        self.softcap = getattr(llm.model.config, "final_logit_softcapping", None)
        self.backbone = llm.model.model
        self.per_layer_masks = accepts_mask_mapping(self.backbone)
        if cfg.checkpointing:
            llm.model.gradient_checkpointing_enable({"use_reentrant": False})
            llm.model.train()  # HF only checkpoints in training mode; dropout is 0 in these LMs

    def embed_rows(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """inputs_embeds [B, L, H] of prompt + behaviour."""
        with torch.no_grad():
            beh = self.llm.input_embeddings()(batch.behaviour.to(self.device)).to(self.dtype)
        return self.prompt(theta, beh)

    def hidden_states(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Final hidden states [B, L, H] of the frozen LM over prompt + behaviour."""
        x = self.embed_rows(theta, batch)
        B, L, _ = x.shape
        mask = attention_mask(self.layout, batch.lengths, self.cfg.mask, self.dtype, self.device)
        # a 4-D mask is used as-is by every layer, so sliding-window layers (Gemma-3, Mistral) get their window
        # applied here, per layer type
        mask = layer_masks(mask, self.llm.model.config, self.per_layer_masks)
        position_ids = torch.arange(L, device=self.device)[None].expand(B, -1)
        return self.backbone(inputs_embeds=x, attention_mask=mask, position_ids=position_ids).last_hidden_state

    def row_nll(self, theta: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sum of NLL per row [B] fp32, token count per row [B])."""
        nll, rows, _ = self._token_nll(theta, batch)
        sums = torch.zeros(batch.size, device=self.device).index_add_(0, rows.to(self.device), nll)
        return sums, batch.lengths.to(self.device).float()

    def row_nll_marked(self, theta: torch.Tensor, batch: Batch, marks: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``row_nll``, plus the NLL sum and count over the ``marks``-ed behaviour tokens ([B, T] bool, e.g.
        the rating tokens of 'rated' text). Returns (sums, counts, marked sums, marked counts)."""
        nll, rows, cols = self._token_nll(theta, batch)
        B = batch.size
        sums = torch.zeros(B, device=self.device).index_add_(0, rows.to(self.device), nll)
        flag = marks[rows, cols] if marks.numel() else torch.zeros(len(rows), dtype=torch.bool)
        msums = torch.zeros(B, device=self.device).index_add_(0, rows[flag].to(self.device), nll[flag.to(self.device)])
        mcounts = torch.zeros(B).index_add_(0, rows[flag], torch.ones(int(flag.sum())))
        return sums, batch.lengths.to(self.device).float(), msums, mcounts

    def _token_nll(self, theta: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """NLL of every real behaviour token, flat, with its (row, column) in the batch."""
        P = self.layout.prefix_len
        hidden = self.hidden_states(theta, batch)
        # hidden at position t predicts token t+1: behaviour token j sits at P+j, predicted from P+j-1
        T = batch.behaviour.shape[1]
        valid = torch.arange(T)[None, :] < batch.lengths[:, None]  # [B, T]
        rows, cols = valid.nonzero(as_tuple=True)
        h = hidden[rows.to(self.device), (P - 1 + cols).to(self.device)]
        targets = batch.behaviour[rows, cols].to(self.device)
        return self._chunked_ce(h, targets), rows, cols

    def _chunked_ce(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, h.shape[0], self.ce_chunk):
            hc, tc = h[s : s + self.ce_chunk], targets[s : s + self.ce_chunk]
            if torch.is_grad_enabled() and hc.requires_grad:
                out.append(checkpoint(self._ce, hc, tc, use_reentrant=False))
            else:
                out.append(self._ce(hc, tc))
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)

    def _ce(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")
