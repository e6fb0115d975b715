"""Diversity-collapse metrics: does recursive self-training narrow what the model says?

Models trained on their own outputs lose the tails of the distribution first, then converge
on a narrow, repetitive mode (Shumailov et al. 2024, "AI models collapse when trained on
recursively generated data"; Guo et al. 2024 on the loss of linguistic diversity). Each
generation's replies get:
- distinct-n (Li et al. 2016): unique n-grams over all n-grams, lowercased whitespace tokens;
- compression ratio: raw bytes over zlib level-9 bytes; repetitive text compresses better;
- embedding dispersion: mean pairwise cosine distance of the replies' sentence embeddings;
- mean token entropy of the model's own next-token distribution over its replies;
and the model gets the perplexity of heldout.txt, 40 paragraphs of plain everyday English
prose written for this project (recipes, letters, diaries, short histories; nothing about AI
or the probe suites). It never enters training, so a rise across generations is lost general
language quality, not a change of values.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from selftrain.kernels.batching import left_padded, pad_id
from selftrain.monitor.behavioural import completion_logprobs, tokenise_pairs

HELDOUT = Path(__file__).with_name("heldout.txt")


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams, counted within each text and pooled; 0.0 if there are none."""
    seen, total = set(), 0
    for t in texts:
        tokens = t.lower().split()
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def compression_ratio(texts: list[str]) -> float:
    """len(utf-8 of the texts joined by newlines) / len(its zlib level-9 compression)."""
    raw = "\n".join(texts).encode("utf-8")
    return len(raw) / len(zlib.compress(raw, 9))


def embedding_dispersion(emb: np.ndarray) -> float:
    """Mean cosine distance (1 - cos) over all pairs of distinct rows; 0.0 for fewer than 2 rows."""
    E = np.asarray(emb, dtype=np.float64)
    if len(E) < 2:
        return 0.0
    norms = np.linalg.norm(E, axis=1, keepdims=True)
    E = E / np.where(norms > 0, norms, 1.0)  # a zero row has cosine 0 with everything
    iu = np.triu_indices(len(E), k=1)
    return float((1.0 - (E @ E.T)[iu]).mean())


@torch.inference_mode()
def mean_token_entropy(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16) -> float:
    """Entropy (nats) of the next-token distribution at each reply token, averaged over every
    reply token of every pair (chat template on the prompt, as the probes build it)."""
    if not pairs:
        raise ValueError("mean_token_entropy needs at least one (prompt, reply) pair")
    res = completion_logprobs(model, tokenizer, tokenise_pairs(tokenizer, pairs), batch_size, "entropy",
                              entropy=True)
    return sum(res["entropy"]) / sum(n for _, n in res["sums"])


def heldout_texts() -> list[str]:
    """The paragraphs of heldout.txt (blank-line separated, whitespace joined)."""
    paragraphs = HELDOUT.read_text(encoding="utf-8").split("\n\n")
    return [" ".join(p.split()) for p in paragraphs if p.strip()]


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 256) -> float:
    """exp(mean next-token NLL) over all tokens of plain texts (no chat template, no special
    tokens, each text truncated to max_length tokens). The first token of a text is context only."""
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("perplexity needs at least one text of 2 or more tokens")
    nll, count = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="perplexity", unit="batch", leave=False):
        batch = [seqs[i] for i in order[start:start + batch_size]]
        ids, mask, pos = left_padded(batch, pad_id(tokenizer))
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos.to(model.device)).logits
        # over flattened rows: on the [b, vocab, t] transpose, cross_entropy took 0.74 s against 0.27 s
        # for the default's 16 paragraphs (2-core CPU, 2026-11-27)
        pred = logits[:, :-1].float()
        loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none").view(ids.shape[0], -1)
        target_mask = mask[:, 1:] * mask[:, :-1]  # a real token predicted from a real token
        nll += float((loss * target_mask).sum())
        count += int(target_mask.sum())
    return math.exp(nll / count)


def collapse_metrics(texts: list[str], emb: np.ndarray | None) -> dict:
    """The text-only metrics of one generation's replies (emb: their sentence embeddings, or None)."""
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "distinct_3": distinct_n(texts, 3), "compression_ratio": compression_ratio(texts),
            "embedding_dispersion": None if emb is None else embedding_dispersion(emb),
            "mean_length_words": float(np.mean([len(t.split()) for t in texts])) if texts else 0.0}
