"""Building blocks: one embedding per field, an MLP, DIN's attention unit, DCN's two cross layers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from userip.ctr.spec import FeatureSpec, Field, module_key


class EmbeddingLayer(nn.Module):
    """Embeds every field of a spec to ``embedding_dim`` (padding index 0 for the tables)."""

    def __init__(self, spec: FeatureSpec, embedding_dim: int, init_std: float = 1e-4):
        super().__init__()
        self.spec, self.embedding_dim = spec, embedding_dim
        self.tables = nn.ModuleDict()
        self.dense = nn.ModuleDict()
        for f in spec.fields:
            if f.kind == "dense":
                self.dense[module_key(f.name)] = nn.Linear(f.dim, embedding_dim)
            elif f.share is None:
                table = nn.Embedding(f.vocab, embedding_dim, padding_idx=0)
                nn.init.normal_(table.weight, std=init_std)
                with torch.no_grad():
                    table.weight[0].zero_()
                self.tables[module_key(f.name)] = table

    def table(self, f: Field) -> nn.Embedding:
        return self.tables[module_key(f.share or f.name)]

    def sequence(self, f: Field, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, L]`` codes -> (``[B, L, E]`` embeddings, ``[B, L]`` float mask of non-padding)."""
        return self.table(f)(x), (x > 0).to(torch.float32)

    def embed_field(self, f: Field, x: torch.Tensor) -> torch.Tensor:
        """One field -> ``[B, E]`` (bags and sequences mean-pooled over their non-zero entries)."""
        if f.kind == "dense":
            return self.dense[module_key(f.name)](x.to(torch.float32))
        if f.kind == "categorical":
            return self.table(f)(x)
        emb, mask = self.sequence(f, x)
        return (emb * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)

    def forward(self, inputs: dict[str, torch.Tensor], exclude: Iterable[str] = ()) -> torch.Tensor:
        """All fields (except ``exclude``) stacked: ``[B, F, E]``."""
        skip = set(exclude)
        embs = [self.embed_field(f, inputs[f.name]) for f in self.spec.fields if f.name not in skip]
        return torch.stack(embs, dim=1)


class MLP(nn.Module):
    """Linear-ReLU-Dropout stack; ``output_dim`` adds a final linear layer; no hidden units = identity."""

    def __init__(
        self,
        input_dim: int,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.0,
        output_dim: int | None = None,
        activation: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        d = input_dim
        for h in hidden_units:
            layers += [nn.Linear(d, int(h)), activation()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = int(h)
        if output_dim is not None:
            layers.append(nn.Linear(d, output_dim))
            d = output_dim
        self.net = nn.Sequential(*layers)
        self.output_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TargetAttention(nn.Module):
    """DIN's activation unit: scores each history item against the candidate from [q, k, q-k, q*k]."""

    def __init__(self, embedding_dim: int, attention_units: Sequence[int] = (36,), use_softmax: bool = False):
        super().__init__()
        self.score = MLP(4 * embedding_dim, attention_units, output_dim=1, activation=nn.Sigmoid)
        self.use_softmax = use_softmax

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(keys)  # [B, H, E]
        s = self.score(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)  # [B, H]
        if self.use_softmax:
            s = torch.softmax(s.masked_fill(mask == 0, -1e9), dim=1)
        s = s * mask
        return (s.unsqueeze(-1) * keys).sum(1)  # [B, E]


class CrossLayer(nn.Module):
    """DCN's cross layer: ``x0 * (w . x) + b + x`` (a weight vector ``w`` [1, d] and a bias outside the product).

    ``w`` is initialised as ``nn.Linear(d, 1, bias=False)`` initialises its weight, ``b`` with zeros."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, d))
        self.bias = nn.Parameter(torch.zeros(d))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * nn.functional.linear(x, self.weight) + self.bias + x


class FullRankCrossLayer(nn.Linear):
    """DCN-V2's cross layer: ``x0 * (W x + b) + x`` (a full-rank ``W`` [d, d])."""

    def __init__(self, d: int):
        super().__init__(d, d)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x0 * super().forward(x) + x
