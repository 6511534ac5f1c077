"""Prompt template with soft-token slots, batch assembly and the two attention masks.

Layout of every row (right-padded, so real tokens keep positions 0..len-1 and never see padding):

    [BOS] [name text 0][soft 0 ...] [name text 1][soft 1 ...] ... [tail text] [behaviour tokens] [pad ...]
          `------- block 0 -------' `------- block 1 -------'

The profile-aware mask (paper) lets each block (a profile's name text and its soft tokens) attend only to BOS
and to itself, causally; the tail and the behaviour tokens attend to everything before them. So a profile's
soft token is read in the context of its own name only, and the behaviour is explained by all profiles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from userip.errors import UseripError

_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class PromptLayout:
    """Token layout of the fixed prompt part, shared by every row."""

    prefix_ids: torch.Tensor  # [P] token ids; soft-token positions hold a placeholder id
    soft_positions: list[torch.Tensor]  # per profile: positions of its soft tokens in the prefix
    block: torch.Tensor  # [P] block id per prefix position: -1 BOS, k for profile k's block, K for the tail
    n_profiles: int

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_ids.numel())


def parse_template(template: str, names: list[str]) -> tuple[list[str], list[int]]:
    """Split a template into the text before each profile slot, and the tail text before {behaviour}.

    Returns (texts, order): ``texts[i]`` precedes slot ``order[i]``; ``texts[-1]`` is the tail.
    """
    texts: list[str] = []
    order: list[int] = []
    pos = 0
    for m in _SLOT.finditer(template):
        name = m.group(1)
        texts.append(template[pos : m.start()])
        pos = m.end()
        if name == "behaviour":
            if template[pos:].strip():
                raise UseripError("config.template: {behaviour} must be the last slot")
            return texts, order
        if name not in names:
            raise UseripError(f"config.template: slot {{{name}}} is not a profile name ({', '.join(names)})")
        if names.index(name) in order:
            raise UseripError(f"config.template: slot {{{name}}} appears twice")
        order.append(names.index(name))
    raise UseripError("config.template: missing the {behaviour} slot")


def build_layout(tokenizer, template: str, names: list[str], n_tokens: list[int]) -> PromptLayout:
    texts, order = parse_template(template, names)
    if sorted(order) != list(range(len(names))):
        missing = [names[i] for i in range(len(names)) if i not in order]
        raise UseripError(f"config.template: no slot for profiles {missing}")
    placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids: list[int] = []
    block: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(int(tokenizer.bos_token_id))
        block.append(-1)
    soft_positions: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(names)
    for text, k in zip(texts[:-1], order, strict=True):
        piece = _encode(tokenizer, text.rstrip())
        ids += piece
        block += [k] * len(piece)
        soft_positions[k] = torch.arange(len(ids), len(ids) + n_tokens[k])
        ids += [placeholder] * n_tokens[k]
        block += [k] * n_tokens[k]
    tail = _encode(tokenizer, texts[-1].rstrip())
    ids += tail
    block += [len(names)] * len(tail)
    return PromptLayout(torch.tensor(ids), soft_positions, torch.tensor(block), len(names))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_behaviour(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Behaviour text follows the template after a space, so it tokenises as running text."""
    return _encode(tokenizer, " " + text.strip())[:max_tokens]


@dataclass
class Batch:
    """A right-padded batch: prefix layout + behaviour token ids per row."""

    behaviour: torch.Tensor  # [B, T] behaviour ids, padded with 0
    lengths: torch.Tensor  # [B] behaviour lengths (>= 1)

    @property
    def size(self) -> int:
        return int(self.behaviour.shape[0])


def make_batch(rows: list[list[int]]) -> Batch:
    if any(len(r) == 0 for r in rows):
        raise ValueError("every behaviour row needs at least one token")
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return Batch(out, lengths)


def attention_mask(layout: PromptLayout, lengths: torch.Tensor, kind: str, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """4-D additive mask [B, 1, L, L] (0 = attend, dtype min = blocked), correct with right padding.

    Padded keys are blocked for every query; a padded query still sees the real tokens before it, so no row
    is fully blocked (a fully blocked row would give NaN in softmax and poison the backward pass).
    """
    P = layout.prefix_len
    L = P + int(lengths.max())
    pos = torch.arange(L, device=device)
    allowed = pos[None, :] <= pos[:, None]  # causal [L, L]
    if kind == "profile":
        block = torch.full((L,), layout.n_profiles, dtype=torch.long, device=device)
        block[:P] = layout.block.to(device)
        qb, kb = block[:, None], block[None, :]
        in_profile_block = (qb >= 0) & (qb < layout.n_profiles)
        # a query in a profile block sees BOS and its own block only
        allowed = allowed & (~in_profile_block | (kb == -1) | (kb == qb))
    elif kind != "causal":
        raise UseripError(f"mask '{kind}': expected 'profile' or 'causal'")
    real = pos[None, :] < (P + lengths.to(device))[:, None]  # [B, L] real (non-pad) keys
    allowed = allowed[None, :, :] & real[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]


def accepts_mask_mapping(backbone: torch.nn.Module) -> bool:
    """Whether a transformers backbone takes ``{layer type: 4-D mask}`` as ``attention_mask`` (Gemma-2/3,
    Qwen-2/3, Cohere-2, GPT-OSS, ... in transformers 5: the models that mix sliding and full attention layers)."""
    import inspect

    try:
        src = inspect.getsource(inspect.unwrap(type(backbone).forward))
    except (OSError, TypeError):
        return False
    return "causal_mask_mapping := attention_mask, dict" in src


def layer_masks(mask: torch.Tensor, config, mapping: bool) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask(s) to hand a backbone, with the model's sliding window applied where it has one.

    transformers builds a sliding-window mask itself only from a 2-D padding mask; a prepared 4-D mask (ours:
    the profile-aware block mask) is returned as-is for every layer, so without this a sliding layer would
    attend past its window and score text differently from the model's own forward. A key is inside the
    window when ``q - window < k`` (transformers' ``sliding_window_overlay``). Models whose config has sliding
    ``layer_types`` get ``{"full_attention": mask, "sliding_attention": windowed}`` when the backbone takes a
    mapping (``mapping``); a model that slides in every layer (Mistral: ``sliding_window`` and no
    ``layer_types``) gets the windowed mask; any other model gets ``mask`` unchanged.
    """
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return mask
    if types is not None and getattr(config, "use_sliding_window", True) is False:
        return mask
    L = mask.shape[-1]
    pos = torch.arange(L, device=mask.device)
    outside = pos[None, :] <= pos[:, None] - window  # [L, L] keys beyond the window of each query
    windowed = mask.masked_fill(outside, torch.finfo(mask.dtype).min)
    # a padded query past the window of every real token would be fully blocked: let it see itself (its output
    # is never scored; real queries already attend to themselves)
    windowed.diagonal(dim1=-2, dim2=-1).fill_(0.0)
    if types is None:
        return windowed
    if not mapping:
        if window < L:
            raise UseripError(f"{type(config).__name__}: this model's sliding-window layers cannot take the profile "
                              f"mask (its backbone takes no per-layer masks) and rows of {L} tokens exceed the "
                              f"window of {window}; lower max_tokens below {window} minus the prompt")
        return mask
    return {t: (windowed if t == "sliding_attention" else mask) for t in set(types)}
