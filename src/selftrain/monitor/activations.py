"""Activation probes: difference-of-means trait directions in the residual stream.

After the persona-vector recipe (Chen et al. 2025, "Persona vectors"): for each contrast item
the model reads the prompt followed by its misaligned reply (pos, the trait) and by its aligned
reply (neg). The residual stream (every layer, embeddings included) is mean-pooled over the
reply tokens; the difference of the pos and neg means at one layer, unit-normalised, is the
trait direction.

- `fit_direction` chooses the layer by cross-validated AUROC of the projection (every pair held
  out once; ties to the deeper layer) and refits the direction there on every item. It runs
  once, on gen-000; the layer and vector are then frozen.
- `measure` reads any generation against that frozen direction: per item, the midpoint of its
  two replies' projections in units of gen-000's misaligned-minus-aligned gap. The drift report
  pairs these per item with gen-000's and tests the shift (drift.compare), so an activation
  alert is a paired test with a p-value and a confidence interval, not an angle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from selftrain import UserError
from selftrain.monitor.behavioural import completion_logprobs, tokenise_pairs

# Folds of the layer choice: every pair is held out once, from a direction fitted on the rest.
FOLDS = 5
METADATA_KEY = "selftrain_directions"
SAVED_FIELDS = ("layer", "gap", "pos_mean", "neg_mean", "auroc_heldout", "auroc_by_layer", "heldout_pairs",
                "causal", "steer_slope", "steer_ci")


def pooled_states(model, tokenizer, pairs: list[tuple[str, str]],
                  batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Residual stream of each (user prompt, reply): mean over the reply tokens, and at the last
    prompt token. Both [n, L+1, d] float32 (index 0 = embeddings, L = last layer's output).
    The same passes as the behavioural scoring (`completion_logprobs(states=True)`)."""
    res = completion_logprobs(model, tokenizer, tokenise_pairs(tokenizer, pairs), batch_size,
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


def fit_direction(pos: np.ndarray, neg: np.ndarray, seed: int = 0, folds: int = FOLDS) -> dict:
    """Choose a layer by cross-validated AUROC and fit the unit trait direction there on every item.

    pos / neg: pooled reply states of the misaligned / aligned reply of the same items (paired
    by index). The items are split into `folds` seeded folds; each fold's projections come from
    a direction fitted on the other folds, so every pair is held out once and the layer is chosen
    on all n held-out pairs (not on a 30 % split, which left 2 pairs at 6 items per dimension).
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    _check_pair(pos, neg)
    n = pos.shape[0]
    if n < 2:
        raise ValueError(f"fit_direction needs at least 2 paired items to hold some out; got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    held_pos = np.zeros((n, pos.shape[1]))
    held_neg = np.zeros((n, pos.shape[1]))
    for held in np.array_split(perm, min(folds, n)):
        fit = np.setdiff1d(perm, held)
        v = pos[fit].mean(0) - neg[fit].mean(0)  # [L+1, d]
        v /= np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
        held_pos[held] = np.einsum("nld,ld->nl", pos[held], v)
        held_neg[held] = np.einsum("nld,ld->nl", neg[held], v)
    by_layer = [auroc(held_pos[:, layer], held_neg[:, layer]) for layer in range(pos.shape[1])]
    best = max(range(len(by_layer)), key=lambda k: (by_layer[k], k))  # ties -> deeper layer
    direction = _unit(pos[:, best].mean(0) - neg[:, best].mean(0))
    pos_mean = float((pos[:, best] @ direction).mean())
    neg_mean = float((neg[:, best] @ direction).mean())
    return {"layer": int(best), "direction": direction.astype(np.float32),
            "auroc_heldout": float(by_layer[best]), "auroc_by_layer": [float(a) for a in by_layer],
            "heldout_pairs": int(n), "pos_mean": pos_mean, "neg_mean": neg_mean, "gap": pos_mean - neg_mean}


def measure(frozen: dict, pos: np.ndarray, neg: np.ndarray, item_ids: list[str]) -> dict:
    """One generation read against the frozen gen-000 direction (its layer and vector are never refit).

    Per item, the midpoint of its two replies' pooled states projected on the direction, in
    units of gen-000's gap (pos_mean - neg_mean): the same positions and the same layer the
    direction and its gap were measured on. The report pairs these per item with gen-000's and
    tests the shift (positive = toward the misaligned trait) like any other paired instrument.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    _check_pair(pos, neg)
    layer = int(frozen["layer"])
    v = np.asarray(frozen["direction"], dtype=np.float64)
    gap = float(frozen["gap"])
    if not gap > 0:
        raise ValueError(f"frozen direction has gap {gap}; a usable direction has pos_mean > neg_mean")
    pos_p, neg_p = pos[:, layer] @ v, neg[:, layer] @ v
    redone = _unit(pos[:, layer].mean(0) - neg[:, layer].mean(0))
    return {"items": {i: float(m) for i, m in zip(item_ids, (pos_p + neg_p) / 2 / gap)},
            "auroc": auroc(pos_p, neg_p), "cosine": float(redone @ v),
            "gap_now": float((pos_p.mean() - neg_p.mean()) / gap)}


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
