"""The core of every scoring pass: a left-padded batch through the model, read as log-probs."""
from __future__ import annotations

import torch

from selftrain.kernels.batching import left_padded


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each distribution along the last axis, from its log-probs."""
    return -(logp.exp() * logp).sum(-1)


def padded_logprobs(model, seqs: list[list[int]], pad: int, keep: int, **kwargs):
    """(log-probs [rows, keep, vocab] at the last `keep` positions, the model's output) of one
    left-padded batch; position t's log-probs are those of token t+1. `kwargs` go to the model."""
    ids, mask, pos = left_padded(seqs, pad)
    dev = model.device
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                logits_to_keep=keep, use_cache=False, **kwargs)
    return torch.log_softmax(out.logits.float(), dim=-1), out
