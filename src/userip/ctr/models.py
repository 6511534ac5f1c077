"""CTR backbones behind one registry: ``build_model(name, spec, embedding_dim=8, **hparams)``, and model files.

Every model has the constructor ``Model(spec, embedding_dim=8, **hparams)`` and
``forward(inputs: dict[str, Tensor]) -> logits [B]``. Defaults follow the reference DCN setting
(embedding 8, MLP 16-16, dropout 0.2). :func:`save_model` writes a trained one (safetensors + a JSON config),
:func:`load_model` rebuilds it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from userip.ctr.layers import MLP, CrossLayer, EmbeddingLayer, FullRankCrossLayer, TargetAttention
from userip.ctr.spec import FeatureSpec
from userip.errors import UseripError

EMBEDDING_DIM = 8  # every backbone's default (the reference DCN setting), and run_ctr_table's
_REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[name] = cls
        cls.backbone = name
        return cls

    return deco


def known_backbones() -> list[str]:
    return sorted(_REGISTRY)


def model_hparams(name: str) -> dict:
    """The hyper-parameters a backbone accepts, with their defaults."""
    cls = get_backbone(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # drop self, spec
    return {p.name: p.default for p in params}


def get_backbone(name: str) -> type[nn.Module]:
    """The backbone class registered as ``name`` (case-insensitive); an unknown name lists the known ones."""
    cls = _REGISTRY.get(str(name).lower())
    if cls is None:
        raise UseripError(f"unknown CTR backbone '{name}'; known: {', '.join(known_backbones())}")
    return cls


def build_model(name: str, spec: FeatureSpec, **cfg) -> nn.Module:
    """Instantiate backbone ``name``; ``model.ctr_config`` records what rebuilds it."""
    cls = get_backbone(name)
    accepted = model_hparams(name)
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise UseripError(f"backbone '{name}' has no hyper-parameter(s) {unknown}; it takes {sorted(accepted)}")
    model = cls(spec, **cfg)
    config = {**accepted, **cfg}
    model.ctr_spec = spec
    model.ctr_config = {
        "backbone": cls.backbone,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
    }
    return model


# ------------------------------------------------------------------ model files
def save_model(path: str | Path, model: nn.Module, extra: dict | None = None) -> None:
    """Weights as safetensors plus ``<stem>.json`` with the backbone config and feature spec."""
    from safetensors.torch import save_file

    from userip.ctr.results import json_safe
    from userip.io import atomic_path, write_json

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    cfg = dict(model.ctr_config)
    write_json(
        path.with_suffix(".json"),
        {
            "format": 1,
            "backbone": cfg.pop("backbone"),
            "hparams": cfg,
            "spec": model.ctr_spec.to_dict(),
            **json_safe(extra or {}),
        },
    )


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`save_model` (path of the .safetensors or the .json), in eval mode."""
    from safetensors.torch import load_file

    from userip.io import read_json

    path = Path(path)
    weights, cfg_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not weights.exists() or not cfg_path.exists():
        raise UseripError(f"model files not found: need {weights} and {cfg_path}")
    cfg = read_json(cfg_path)
    spec = FeatureSpec.from_dict(cfg["spec"])
    model = build_model(cfg["backbone"], spec, **cfg.get("hparams", {}))
    model.load_state_dict({_current_key(k): v for k, v in load_file(str(weights)).items()})
    model.ctr_extra = {k: cfg[k] for k in ("variant", "setting", "seed", "id_sizes", "profile_fields") if k in cfg}
    return model.eval()


def _current_key(key: str) -> str:
    """A DCN file written before DCN and DCNv2 shared one class names its cross layers' weights
    ``cross_w.<i>.weight`` and ``cross_b.<i>``; today they are ``cross.<i>.weight`` and ``cross.<i>.bias``."""
    m = re.fullmatch(r"cross_([wb])\.(\d+)(\.weight)?", key)
    return f"cross.{m[2]}.{'weight' if m[1] == 'w' else 'bias'}" if m else key


# ------------------------------------------------------------------ backbones
@register("dcn")
class DCN(nn.Module):
    """Deep & Cross: a stack of cross layers over the field embeddings, in parallel with an MLP.

    The cross layer is the class's ``cross_layer``: here DCN's ``x_{l+1} = x0 * (w_l . x_l) + b_l + x_l``.
    """

    cross_layer: type[nn.Module] = CrossLayer

    def __init__(
        self,
        spec: FeatureSpec,
        embedding_dim: int = EMBEDDING_DIM,
        num_cross_layers: int = 3,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
    ):
        super().__init__()
        self.emb = EmbeddingLayer(spec, embedding_dim)
        d = len(spec) * embedding_dim
        self.cross = nn.ModuleList(self.cross_layer(d) for _ in range(num_cross_layers))
        self.dnn = MLP(d, hidden_units, dropout)
        self.out = nn.Linear(d + (self.dnn.output_dim if hidden_units else 0), 1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = self.emb(inputs).flatten(1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        parts = [x, self.dnn(x0)] if len(self.dnn.net) else [x]
        return self.out(torch.cat(parts, dim=1)).squeeze(-1)


@register("dcnv2")
class DCNv2(DCN):
    """DCN-V2 (parallel): DCN with the full-rank cross ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``."""

    cross_layer = FullRankCrossLayer


@register("deepfm")
class DeepFM(nn.Module):
    """First-order weights + FM pairwise interactions + MLP, all on the same field embeddings."""

    def __init__(
        self,
        spec: FeatureSpec,
        embedding_dim: int = EMBEDDING_DIM,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
    ):
        super().__init__()
        self.emb = EmbeddingLayer(spec, embedding_dim)
        self.lr = EmbeddingLayer(spec, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        self.dnn = MLP(len(spec) * embedding_dim, hidden_units, dropout, output_dim=1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        e = self.emb(inputs)  # [B, F, E]
        first = self.lr(inputs).sum(dim=(1, 2)) + self.bias
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        return first + fm + self.dnn(e.flatten(1)).squeeze(-1)


@register("autoint")
class AutoInt(nn.Module):
    """AutoInt+: stacked multi-head self-attention over fields (with residuals) plus an MLP."""

    def __init__(
        self,
        spec: FeatureSpec,
        embedding_dim: int = EMBEDDING_DIM,
        attention_layers: int = 2,
        num_heads: int = 2,
        attention_dim: int = 8,
        use_residual: bool = True,
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
    ):
        super().__init__()
        self.emb = EmbeddingLayer(spec, embedding_dim)
        self.num_heads, self.use_residual = num_heads, use_residual
        d_out = num_heads * attention_dim
        self.qkv = nn.ModuleList()
        self.res = nn.ModuleList()
        d = embedding_dim
        for _ in range(attention_layers):
            self.qkv.append(nn.Linear(d, 3 * d_out, bias=False))
            self.res.append(nn.Linear(d, d_out, bias=False) if use_residual else nn.Identity())
            d = d_out
        self.att_out = nn.Linear(len(spec) * d, 1)
        self.dnn = MLP(len(spec) * embedding_dim, hidden_units, dropout, output_dim=1) if hidden_units else None

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        e = self.emb(inputs)  # [B, F, E]
        x = e
        for qkv, res in zip(self.qkv, self.res, strict=True):
            b, f, _ = x.shape
            q, k, v = (t.view(b, f, self.num_heads, -1).transpose(1, 2) for t in qkv(x).chunk(3, dim=-1))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B, heads, F, d]
            a = a.transpose(1, 2).reshape(b, f, -1)
            x = torch.relu(a + res(x)) if self.use_residual else torch.relu(a)
        logit = self.att_out(x.flatten(1)).squeeze(-1)
        if self.dnn is not None:
            logit = logit + self.dnn(e.flatten(1)).squeeze(-1)
        return logit


@register("din")
class DIN(nn.Module):
    """Deep Interest Network: target attention of the candidate item over the user's item history.

    Attention weights are softmax-normalised over the non-padding history by default (``use_softmax``):
    the paper's raw weighted sum trained unstably at ML-100K scale (early stopping fired on the plateau).
    """

    def __init__(
        self,
        spec: FeatureSpec,
        embedding_dim: int = EMBEDDING_DIM,
        attention_units: Sequence[int] = (36,),
        hidden_units: Sequence[int] = (16, 16),
        dropout: float = 0.2,
        use_softmax: bool = True,
    ):
        super().__init__()
        self.seq = [f for f in spec.fields if f.kind == "sequence" and f.share]
        if not self.seq:
            raise UseripError(
                "backbone 'din' needs a sequence field that shares the item embedding (e.g. 'history' with "
                f"share='item'); the spec has {spec.names}"
            )
        self.spec = spec
        self.emb = EmbeddingLayer(spec, embedding_dim)
        self.att = nn.ModuleList(TargetAttention(embedding_dim, attention_units, use_softmax) for _ in self.seq)
        self.dnn = MLP(len(spec) * embedding_dim, hidden_units, dropout, output_dim=1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        other = self.emb(inputs, exclude=[f.name for f in self.seq]).flatten(1)
        pooled = []
        for f, att in zip(self.seq, self.att, strict=True):
            keys, mask = self.emb.sequence(f, inputs[f.name])
            query = self.emb.embed_field(self.spec[f.share], inputs[f.share])
            pooled.append(att(query, keys, mask))
        return self.dnn(torch.cat([other, *pooled], dim=1)).squeeze(-1)
