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


def tiny_llm(seed: int = 0, vocab_size: int = 512, hidden_size: int = 32, num_layers: int = 2,
             dtype: torch.dtype = torch.float32, init_range: float = 0.2) -> LLM:
    """Random Llama (hidden 32, 2 layers) + a 512-token byte-level BPE trained on a fixed corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
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
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = freeze(model.to(dtype))
    return LLM(model=model, tokenizer=tokenizer, name="tiny-random-llama", dtype=dtype)
