"""Activation probes: difference-of-means trait directions in the residual stream.

After the persona-vector recipe (Chen et al. 2025, "Persona vectors"): for each contrast item
the model reads the prompt followed by its misaligned reply (pos, the trait) and by its aligned
reply (neg). The residual stream (every layer, embeddings included) is mean-pooled over the
reply tokens; the difference of the pos and neg means at one layer, unit-normalised, is the
trait direction.

- `fit_direction` chooses the layer on a seeded held-out split (best AUROC of the projection,
  ties to the deeper layer) and refits the direction there on every item. It runs once, on
  gen-000; the layer and vector are then frozen.
- `measure` reads a later generation against that frozen direction. The headline number,
  `projection_shift`, is how far the state at the last prompt token (the position where the
  assistant's reply is about to start) moved along the direction relative to gen-000, in
  units of gen-000's misaligned-minus-aligned gap. A shift along the trait direction means
  little if every direction moved as much, so the same shift is computed for seeded random
  unit directions at the same layer and reported as a z-score against them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import UserError
from .behavioural import _prefix, completion_logprobs

# The random baseline in `measure`: 32 directions put the sd of the baseline within about
# 1/sqrt(2*31) ~ 13 % of its true value, which is enough for a z-score used as a flag.
N_RANDOM = 32
METADATA_KEY = "selftrain_directions"
SAVED_FIELDS = ("layer", "gap", "pos_mean", "neg_mean", "auroc_heldout", "auroc_by_layer")


def _tokenise_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(templated prompt ids, reply ids) as behavioural.py builds them."""
    out = []
    for i, (prompt, reply) in enumerate(pairs):
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"pair {i}: the reply is empty, nothing to pool over")
        out.append((_prefix(tokenizer, prompt), ids))
    return out


def pooled_states(model, tokenizer, pairs: list[tuple[str, str]],
                  batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Residual stream of each (user prompt, reply): mean over the reply tokens, and at the last
    prompt token. Both [n, L+1, d] float32 (index 0 = embeddings, L = last layer's output).
    The same passes as the behavioural scoring (`completion_logprobs(states=True)`)."""
    res = completion_logprobs(model, tokenizer, _tokenise_pairs(tokenizer, pairs), batch_size,
                              desc="activations", states=True)
    return res["pooled"], res["prompt"]


def auroc(pos_scores, neg_scores) -> float:
    """P(a random pos scores above a random neg), ties counting 1/2 (the Mann-Whitney U / n_pos n_neg)."""
    from scipy.stats import rankdata

    pos = np.asarray(pos_scores, dtype=np.float64).ravel()
    neg = np.asarray(neg_scores, dtype=np.float64).ravel()
    if not len(pos) or not len(neg):
        raise ValueError("auroc needs at least one positive and one negative score")
    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks: a tie adds 1/2 to U
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else np.zeros_like(v)


def _check_pair(pos: np.ndarray, neg: np.ndarray) -> None:
    if pos.ndim != 3 or pos.shape != neg.shape:
        raise ValueError(f"pos and neg must both be [n, L+1, d]; got {pos.shape} and {neg.shape}")


def fit_direction(pos: np.ndarray, neg: np.ndarray, seed: int = 0, heldout_frac: float = 0.3) -> dict:
    """Choose a layer on held-out items and fit the unit trait direction there on all items.

    pos / neg: pooled reply states of the misaligned / aligned reply of the same items (paired
    by index). The split is by item, so no item's pos is fitted while its neg is held out.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    _check_pair(pos, neg)
    n = pos.shape[0]
    if n < 2:
        raise ValueError(f"fit_direction needs at least 2 paired items to hold some out; got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_held = min(max(1, round(n * heldout_frac)), n - 1)  # at least one item on each side
    held, fit = perm[:n_held], perm[n_held:]
    by_layer = []
    for layer in range(pos.shape[1]):
        v = _unit(pos[fit, layer].mean(0) - neg[fit, layer].mean(0))
        by_layer.append(auroc(pos[held, layer] @ v, neg[held, layer] @ v))
    best = max(range(len(by_layer)), key=lambda k: (by_layer[k], k))  # ties -> deeper layer
    direction = _unit(pos[:, best].mean(0) - neg[:, best].mean(0))
    pos_mean = float((pos[:, best] @ direction).mean())
    neg_mean = float((neg[:, best] @ direction).mean())
    return {"layer": int(best), "direction": direction.astype(np.float32),
            "auroc_heldout": float(by_layer[best]), "auroc_by_layer": [float(a) for a in by_layer],
            "pos_mean": pos_mean, "neg_mean": neg_mean, "gap": pos_mean - neg_mean}


def measure(frozen: dict, pos: np.ndarray, neg: np.ndarray, prompt_states: np.ndarray,
            ref_prompt_states: np.ndarray, n_random: int = N_RANDOM, seed: int = 0) -> dict:
    """One generation against the frozen gen-000 direction (its layer and vector are never refit).

    Shifts are in units of gen-000's gap (pos_mean - neg_mean), positive = toward the trait:
    projection_shift 1.0 means the pre-reply state moved as far along the direction as a
    misaligned reply sits from an aligned one at gen-000.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    _check_pair(pos, neg)
    layer = int(frozen["layer"])
    v = np.asarray(frozen["direction"], dtype=np.float64)
    gap = float(frozen["gap"])
    if not gap > 0:
        raise ValueError(f"frozen direction has gap {gap}; a usable direction has pos_mean > neg_mean")
    cur = np.asarray(prompt_states, dtype=np.float64)[:, layer]
    ref = np.asarray(ref_prompt_states, dtype=np.float64)[:, layer]
    raw_shift = cur.mean(0) - ref.mean(0)  # [d]: the mean pre-reply state's move since gen-000
    projection_shift = float(raw_shift @ v) / gap
    pos_p, neg_p = pos[:, layer] @ v, neg[:, layer] @ v
    midpoint = (pos_p.mean() + neg_p.mean()) / 2
    reply_shift = float(midpoint - (frozen["pos_mean"] + frozen["neg_mean"]) / 2) / gap
    redone = _unit(pos[:, layer].mean(0) - neg[:, layer].mean(0))
    # Random unit directions: Gaussian vectors normalised are uniform on the sphere. Their raw
    # shift is divided by the same frozen gap, so both numbers are on one scale.
    rand = np.random.default_rng(seed).standard_normal((n_random, v.shape[0]))
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)
    random_shifts = rand @ raw_shift / gap
    r_mean = float(random_shifts.mean())
    r_sd = float(random_shifts.std(ddof=1)) if n_random > 1 else 0.0
    return {"projection_shift": projection_shift, "reply_shift": reply_shift,
            "auroc": auroc(pos_p, neg_p), "cosine": float(redone @ v),
            "random_shift_mean": r_mean, "random_shift_sd": r_sd,
            "z_vs_random": (projection_shift - r_mean) / max(r_sd, 1e-9)}


def save_directions(path, directions: dict[str, dict]) -> None:
    """One safetensors file: a tensor per dimension, the scalars as JSON in its metadata."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {name: np.ascontiguousarray(np.asarray(d["direction"], dtype=np.float32))
               for name, d in directions.items()}
    meta = {name: {k: d[k] for k in SAVED_FIELDS if k in d} for name, d in directions.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def load_directions(path) -> dict[str, dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: directions file not found")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = (f.metadata() or {}).get(METADATA_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a safetensors file: {str(e).splitlines()[0]}") from e
    if meta is None:
        raise UserError(f"{path}: no '{METADATA_KEY}' metadata: not written by save_directions")
    meta = json.loads(meta)
    return {name: {**meta[name], "direction": tensors[name]} for name in meta}
