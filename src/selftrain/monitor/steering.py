"""Steering: is a frozen trait direction causal for its own dimension's behaviour?

A difference-of-means direction separates aligned from misaligned replies; that alone does not
show the model uses it. The field's check (Turner et al. 2023, "Activation addition"; Chen et
al. 2025, "Persona vectors") is to add the direction during a forward pass and see whether
behaviour moves. Here, at gen-000, every direction is added at its own layer, at every
position, as alpha x (gen-000's misaligned-aligned gap) x the unit direction, for each alpha
of `monitor.steer_alphas`, while the dimension's contrast items are scored. Adding the trait
(alpha > 0) should lower P(aligned), removing it should raise it.

Per item, the least-squares slope of its score on alpha (alpha 0 = the unsteered score); the
direction's slope is the mean over items, with a t interval over items. A direction is
`causal` when that interval lies wholly below zero and the fitted change over the alpha range
(-slope x (max alpha - min alpha)) is at least `min_effect`, the smallest behavioural shift the
monitor alerts on: a direction whose whole steering range moves behaviour less than a drift
the monitor cares about cannot explain one. Otherwise it is `not_causal`, and the report
never lets its activation results raise an alert.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from scipy import stats

from selftrain.monitor.behavioural import score_suite
from selftrain.monitor.suites import Suite


def _module_at(model, layer: int):
    """The module whose output is hidden_states[layer]: the embeddings at 0, the final norm at
    the last layer (transformers reports the normed output there), decoder layer `layer - 1`
    in between."""
    base = getattr(model, "model", None) or model.base_model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder .layers to steer")
    if layer == 0:
        return model.get_input_embeddings()
    if layer == len(layers):
        return base.norm
    return layers[layer - 1]


@contextmanager
def steered(model, layer: int, vector):
    """Add `vector` ([d]) to hidden_states[layer] at every position while inside the block."""
    module = _module_at(model, layer)
    ref = next(model.parameters())
    v = torch.as_tensor(np.asarray(vector), dtype=ref.dtype, device=ref.device)

    def add(_mod, _inp, out):
        if isinstance(out, tuple):
            return (out[0] + v,) + tuple(out[1:])
        return out + v

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def slope_ci(alphas: list[float], scores: np.ndarray, level: float = 0.95) -> dict:
    """scores: [items, len(alphas)]. Per-item least-squares slope on alpha; mean, t interval over items."""
    a = np.asarray(alphas, dtype=np.float64)
    y = np.asarray(scores, dtype=np.float64)
    ac = a - a.mean()
    slopes = (y - y.mean(1, keepdims=True)) @ ac / (ac @ ac)
    n = len(slopes)
    mean = float(slopes.mean())
    if n < 2:
        return {"slope": mean, "ci": [None, None], "n": n}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * slopes.std(ddof=1) / math.sqrt(n))
    return {"slope": mean, "ci": [mean - half, mean + half], "n": n}


def steering_check(model, tokenizer, suite: Suite, directions: dict[str, dict], alphas: list[float],
                   base_scores: dict[str, float], min_effect: float, batch_size: int = 16) -> dict[str, dict]:
    """Steer every direction (dimension -> frozen direction dict) over its own contrast items.

    base_scores: the unsteered P(aligned) of each contrast item (the probe stage's own scores),
    used as alpha = 0. Returns per dimension: alphas, the mean score at each, slope, its CI and
    `causal`."""
    out = {}
    for dim, d in directions.items():
        items = [it for it in suite.items if it.dimension == dim and it.kind == "contrast"]
        if len(items) < 2:
            continue
        sub = Suite(name=suite.name, version=suite.version, dimensions={dim: suite.dimensions[dim]}, items=items,
                    sha256=suite.sha256)
        vec = float(d["gap"]) * np.asarray(d["direction"], dtype=np.float64)
        grid = sorted(set(float(a) for a in alphas) | {0.0})
        cols = []
        for alpha in grid:
            if alpha == 0.0:
                cols.append([base_scores[it.id] for it in items])
                continue
            with steered(model, int(d["layer"]), alpha * vec):
                got = {r["item_id"]: r["score"] for r in score_suite(model, tokenizer, sub, batch_size)}
            cols.append([got[it.id] for it in items])
        scores = np.array(cols).T  # [items, alphas]
        fit = slope_ci(grid, scores)
        change = -fit["slope"] * (grid[-1] - grid[0])  # toward aligned when removing the trait
        causal = fit["ci"][1] is not None and fit["ci"][1] < 0 and change >= min_effect
        out[dim] = {"layer": int(d["layer"]), "alphas": grid, "mean_score": scores.mean(0).tolist(),
                    **fit, "change": float(change), "min_effect": float(min_effect), "causal": bool(causal)}
    return out
