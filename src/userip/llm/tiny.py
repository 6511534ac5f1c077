"""A tiny randomly initialised Llama with a small byte-level BPE tokenizer, for unit tests (no download)."""

from __future__ import annotations

import torch

from userip.llm.load import LLM, freeze

_CORPUS = [
    "The user's hobby is . The user's background is . The user watched: ",
    "Toy Story (1995); Heat (1995); GoldenEye (1995); Casino (1995); Jumanji (1995);",
    "action comedy drama thriller romance horror science fiction documentary war western",
    "In short, this user likes movies about love, space, crime, music and children.",
] * 4


def _tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def _config_kwargs(tokenizer, vocab_size: int, hidden_size: int, num_layers: int, init_range: float) -> dict:
    """What the tiny Llama and the tiny Gemma-3 configs share: 4 heads over 2 KV heads, tied embeddings,
    eager attention, the tokenizer's special tokens."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
        initializer_range=init_range,
    )


def _seeded_llm(model_cls, config, seed: int, tokenizer, dtype: torch.dtype, name: str) -> LLM:
    """The model built from ``config`` with weights drawn from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    return LLM(model=freeze(model.to(dtype)), tokenizer=tokenizer, name=name, dtype=dtype)


def tiny_llm(seed: int = 0, vocab_size: int = 512, hidden_size: int = 32, num_layers: int = 2,
             dtype: torch.dtype = torch.float32, init_range: float = 0.2) -> LLM:
    """Random Llama (hidden 32, 2 layers) + a 512-token byte-level BPE trained on a fixed corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer(vocab_size)
    config = LlamaConfig(**_config_kwargs(tokenizer, len(tokenizer), hidden_size, num_layers, init_range))
    return _seeded_llm(LlamaForCausalLM, config, seed, tokenizer, dtype, "tiny-random-llama")


def tiny_gemma3_llm(seed: int = 0, vocab_size: int = 262_144, hidden_size: int = 32, num_layers: int = 2,
                    sliding_window: int = 8, dtype: torch.dtype = torch.float32, init_range: float = 0.2) -> LLM:
    """Random text-only Gemma-3 (``Gemma3ForCausalLM``) with the same tiny BPE tokenizer, built from its config.

    It keeps what makes Gemma-3 different from the Llama path, at test size: input embeddings scaled by
    sqrt(hidden) inside ``embed_tokens`` (so ``inputs_embeds`` must come from that module, not its weight),
    sliding-window layers next to full-attention ones (layer 0 sliding, layer 1 full; ``sliding_window`` small
    enough to bind on test windows), and by default the real 262,144-row vocabulary (8.4M embedding
    parameters at hidden 32, ~34 MB fp32: cheap, and it exercises the LM-head chunking). Token ids the tokenizer
    never produces are simply unused rows.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = _tiny_tokenizer(512)
    config = Gemma3TextConfig(
        **_config_kwargs(tokenizer, max(vocab_size, len(tokenizer)), hidden_size, num_layers, init_range),
        head_dim=hidden_size // 4,
        query_pre_attn_scalar=hidden_size // 4,
        sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
    )
    return _seeded_llm(Gemma3ForCausalLM, config, seed, tokenizer, dtype, "tiny-random-gemma3")
