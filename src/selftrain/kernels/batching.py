"""Batches of token sequences for decoder-only models: the pad id, left padding, and the token
prefix every sequence of a call shares, run through the model once so its KV cache can be reused
by every row (the engine's prompts, the monitor's scoring passes)."""
from __future__ import annotations

from typing import Sequence

import torch

from selftrain.kernels.kv_cache import KV, plain_cache


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token id, or its end-of-sequence id where it has no pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids that start at 0 on the first real token."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def padded_after_prefix(seqs: Sequence[Sequence[int]], n_prefix: int,
                        pad: int) -> tuple[list[list[int]], list[list[int]]]:
    """Rows that continue a shared prefix of `n_prefix` tokens: each sequence left-padded to the
    longest, and the attention mask over [shared prefix][padding][sequence]."""
    w = max(map(len, seqs))
    ids = [[pad] * (w - len(s)) + list(s) for s in seqs]
    mask = [[1] * n_prefix + [0] * (w - len(s)) + [1] * len(s) for s in seqs]
    return ids, mask


def shared_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares, leaving each at least one token of its own."""
    n = max(0, min(len(x) for x in seqs) - 1)
    first = seqs[0]
    for x in seqs[1:]:
        k = 0
        while k < n and x[k] == first[k]:
            k += 1
        n = k
    return n


def shared_prefix(model, seqs: Sequence[Sequence[int]], min_tokens: int = 1) -> tuple[int, KV | None]:
    """(length, per-layer keys and values) of the prefix every sequence shares, run through the
    model once; (0, None) when it is shorter than `min_tokens` or the model's cache is not plain
    DynamicLayers (sliding-window or recurrent layers cannot be shared this way)."""
    n = shared_prefix_length(seqs)
    if n < max(1, min_tokens):
        return 0, None
    out = model(input_ids=torch.tensor([list(seqs[0][:n])], device=model.device), use_cache=True, logits_to_keep=1)
    if not plain_cache(out.cache):
        return 0, None
    return n, [(k, v) for k, v, *_ in out.cache]
