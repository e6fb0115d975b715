"""Statistics of an arm comparison, with the training run as the unit: a permutation test of arm
labels across whole runs (exact up to EXACT_LIMIT splits, Monte Carlo beyond), Holm's
correction, the pooled seed-to-seed sd, t intervals, and power and seeds-needed planning.
Pure functions of arrays; compare.py says why these tests (its docstring) and applies them.
"""
from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations

import numpy as np
from scipy import integrate, stats

EXACT_LIMIT = 200_000  # splits enumerated exactly up to this many (r = 9 per arm); Monte Carlo beyond
POWER = 0.8  # the power a design is planned for
MAX_SEEDS = 1000  # planning gives up beyond this many seeds per arm


@lru_cache(maxsize=32)
def _all_splits(n_a: int, n_b: int) -> np.ndarray:
    n = n_a + n_b
    masks = np.zeros((math.comb(n, n_a), n), dtype=bool)
    for i, chosen in enumerate(combinations(range(n), n_a)):
        masks[i, list(chosen)] = True
    masks.setflags(write=False)
    return masks


def splits(n_a: int, n_b: int, n_perm: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Labelings of n_a + n_b runs (rows; True = arm A; the runs of arm A come first in the data):
    all C(n, n_a) when there are at most EXACT_LIMIT (exact), else the observed labeling and
    n_perm random ones (Monte Carlo)."""
    if math.comb(n_a + n_b, n_a) <= EXACT_LIMIT:
        return _all_splits(n_a, n_b), True
    drawn = np.argsort(rng.random((n_perm, n_a + n_b)), axis=1) < n_a  # n_a True per row, uniformly placed
    return np.vstack([np.arange(n_a + n_b) < n_a, drawn]), False


def p_floor(n_a: int, n_b: int, n_perm: int | None = None) -> float:
    """The smallest p the permutation test can give: with equal arms the mirror split ties with
    the observed one, so 2 / C(2r, r); Monte Carlo cannot go below 1 / (n_perm + 1)."""
    total = math.comb(n_a + n_b, n_a)
    exact = (2 if n_a == n_b else 1) / total
    return exact if total <= EXACT_LIMIT or n_perm is None else max(exact, 1 / (n_perm + 1))


def permutation_p(ya: np.ndarray, yb: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """Two-sided p of mean(A) - mean(B), per dimension, permuting arm labels across whole runs.
    ya: (..., n_a, D) run scores of arm A; yb: (..., n_b, D); leading axes are independent
    data sets (the simulation tests use them), all tested against the same splits."""
    ya, yb = np.asarray(ya, float), np.asarray(yb, float)
    n_a, n_b, D = ya.shape[-2], yb.shape[-2], ya.shape[-1]
    masks, _ = splits(n_a, n_b, n_perm, rng)
    W = masks / n_a - (~masks) / n_b  # (P, n): the difference of means under each split
    lead = ya.shape[:-2]
    y = np.concatenate([ya, yb], axis=-2).reshape(-1, n_a + n_b, D)
    obs = np.abs(y[:, :n_a].mean(1) - y[:, n_a:].mean(1))
    tol = 1e-9 * np.maximum(obs, 1e-3)  # splits that tie with the observed one in exact arithmetic count
    count = np.zeros_like(obs)
    step = max(1, int(4e6 // (len(W) * D)))  # bounded memory for many data sets at once
    for s in range(0, len(y), step):
        T = np.abs(np.matmul(W, y[s:s + step]))  # (b, P, D)
        count[s:s + step] = (T >= (obs[s:s + step] - tol[s:s + step])[:, None, :]).sum(1)
    return (count / len(W)).reshape(*lead, D)


def holm_adjust(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values along the last axis (the same numbers as stats.holm, vectorised)."""
    p = np.asarray(p, float)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, -1) * (m - np.arange(m))
    adj = np.minimum(1.0, np.maximum.accumulate(ranked, axis=-1))
    out = np.empty_like(adj)
    np.put_along_axis(out, order, adj, -1)
    return out


def power(n_a: int, n_b: int, sigma: float | None, effect: float, alpha: float) -> float | None:
    """Power of the two-sided pooled two-sample t test at level alpha to detect a true difference
    `effect` between arms of n_a and n_b runs whose run scores have sd `sigma`."""
    df = n_a + n_b - 2
    if sigma is None or df < 1:
        return None
    if sigma <= 0:
        return 1.0 if effect else alpha
    ncp = abs(effect) / (sigma * math.sqrt(1 / n_a + 1 / n_b))
    t = stats.t.ppf(1 - alpha / 2, df)
    # P(|Z + ncp| > t S) with S^2 ~ chi2(df)/df, integrated over Z. scipy's noncentral t returns
    # nan at small df with a large ncp, which made the seeds needed jump around as sd changed.
    def reject(z: float) -> float:
        return stats.norm.pdf(z) * stats.chi2.cdf(df * ((z + ncp) / t) ** 2, df)
    pw = integrate.quad(reject, -12, 12, points=[-ncp] if ncp < 12 else None, limit=200)[0]
    return float(min(1.0, max(pw, 0.0)))


def design_power(n_a: int, n_b: int, sigma: float | None, effect: float, alpha: float, m: int,
                 n_perm: int | None = None) -> float | None:
    """Power of one of m Holm-corrected tests (planned at alpha / m); 0 when the permutation
    floor keeps every Holm p at or above alpha."""
    if m * p_floor(n_a, n_b, n_perm) >= alpha:
        return 0.0
    return power(n_a, n_b, sigma, effect, alpha / m)


def seeds_needed(sigma: float | None, effect: float, alpha: float, m: int, target: float = POWER) -> int | None:
    """Seeds per arm (equal arms) for `target` power to detect `effect` with m tests at family-wise
    alpha; with sigma None (not measured) the permutation floor alone. None beyond MAX_SEEDS."""
    for r in range(2, MAX_SEEDS + 1):
        if m * p_floor(r, r) >= alpha:
            continue
        pw = power(r, r, sigma, effect, alpha / m)
        if pw is None or pw >= target:
            return r
    return None


def seed_sd(y: dict[str, np.ndarray]) -> tuple[np.ndarray | None, int]:
    """Pooled within-arm sd of run scores per dimension (y[arm]: (runs, D)), and its df."""
    df = sum(len(v) - 1 for v in y.values())
    if df < 1:
        return None, 0
    ss = sum(((v - v.mean(0)) ** 2).sum(0) for v in y.values())
    return np.sqrt(ss / df), df


def diff_ci(ya: np.ndarray, yb: np.ndarray) -> np.ndarray | None:
    """95% pooled two-sample t interval of mean(A) - mean(B) per dimension, (D, 2); None when
    neither arm has two runs (seed-to-seed variation unmeasured)."""
    sd, df = seed_sd({"a": ya, "b": yb})
    if sd is None:
        return None
    d = ya.mean(0) - yb.mean(0)
    half = stats.t.ppf(0.975, df) * sd * math.sqrt(1 / len(ya) + 1 / len(yb))
    return np.stack([d - half, d + half], axis=-1)


def analyse(y: dict[str, np.ndarray], alpha: float, n_perm: int, rng: np.random.Generator) -> dict:
    """Every pair of arms on every dimension. y[arm]: run scores (..., runs, D), leading axes
    being independent data sets. Holm runs over all pairs x dimensions of one data set.
    Returns pairs, m (tests), and per pair (..., D) arrays diff, p, p_holm, significant, with
    the pair's p floor and whether m x floor < alpha (the design can reach alpha)."""
    pairs = list(combinations(y, 2))
    out = {"pairs": pairs, "m": 0, "diff": [], "p": [], "floor": [], "reachable": []}
    if not pairs:
        return out
    for a, b in pairs:
        out["diff"].append(np.asarray(y[a]).mean(-2) - np.asarray(y[b]).mean(-2))
        out["p"].append(permutation_p(y[a], y[b], n_perm, rng))
        out["floor"].append(p_floor(np.shape(y[a])[-2], np.shape(y[b])[-2], n_perm))
    P = np.stack(out["p"], axis=-2)  # (..., pairs, D)
    m = P.shape[-2] * P.shape[-1]
    adj = holm_adjust(P.reshape(*P.shape[:-2], m)).reshape(P.shape)
    out["m"] = m
    out["reachable"] = [m * f < alpha for f in out["floor"]]
    out["p_holm"] = [adj[..., i, :] for i in range(len(pairs))]
    # a pair whose floor keeps m x floor >= alpha calls nothing, whatever Holm's later steps allow
    out["significant"] = [(adj[..., i, :] < alpha) & out["reachable"][i] for i in range(len(pairs))]
    return out
