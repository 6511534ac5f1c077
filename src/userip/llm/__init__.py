"""Frozen causal LMs: the bundled SmolLM2 GGUF, any local HF directory or GGUF file, and a tiny test model."""

from userip.llm.load import LLM, freeze, load_llm, pick_dtype, resolve_model
from userip.llm.tiny import tiny_gemma3_llm, tiny_llm

__all__ = ["LLM", "freeze", "load_llm", "pick_dtype", "resolve_model", "tiny_gemma3_llm", "tiny_llm"]
