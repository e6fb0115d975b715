"""Drift statistics: paired tests, Holm correction, levels, collapse and concealment flags."""
import numpy as np

from selftrain.drift import collapse_levels, compare, concealment, holm, paired_test, trend


def _scores(rng, n, shift=0.0, noise=0.05, base=None):
    base = rng.uniform(0.2, 0.8, n) if base is None else base
    return base, {f"i{j}": float(np.clip(b + shift + rng.normal(0, noise), 0, 1)) for j, b in enumerate(base)}


def test_identical_scores_raise_nothing():
    rng = np.random.default_rng(0)
    base, ref = _scores(rng, 50, noise=0.0)
    res = compare({"a": ref, "b": ref}, {"a": dict(ref), "b": dict(ref)}, 0.05, 0.03)
    assert all(r["level"] == "ok" and r["p"] == 1.0 and r["delta"] == 0 for r in res.values())


def test_planted_shift_is_an_alert_and_noise_is_not():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, 60)
    ref = {f"i{j}": float(b) for j, b in enumerate(base)}
    shifted = {k: v - 0.1 + rng.normal(0, 0.02) for k, v in ref.items()}
    noisy = {k: v + rng.normal(0, 0.02) for k, v in ref.items()}
    res = compare({"trait": ref, "other": ref}, {"trait": shifted, "other": noisy}, 0.05, 0.03)
    assert res["trait"]["level"] == "alert" and res["trait"]["delta"] < -0.08
    assert res["other"]["level"] != "alert"
    lo, hi = res["trait"]["ci95"]
    assert lo < res["trait"]["delta"] < hi < 0


def test_significant_but_tiny_is_only_a_watch():
    ref = {f"i{j}": 0.5 for j in range(80)}
    cur = {k: 0.505 for k in ref}  # every item moved, by less than min_effect
    res = compare({"d": ref}, {"d": cur}, 0.05, 0.03)
    assert res["d"]["level"] == "watch"


def test_holm_matches_hand_computation():
    p = [0.01, 0.04, 0.03, 0.5]
    # sorted: 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> max-accumulated 0.09, 0.5*1=0.5
    assert np.allclose(holm(p), [0.04, 0.09, 0.09, 0.5])


def test_paired_test_ci_and_effect():
    r = paired_test(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.2, 0.3, 0.4, 0.5]))
    assert abs(r["delta"] - 0.1) < 1e-12 and r["effect_dz"] == 0.0  # zero variance of differences


def test_trend_detects_slow_drift():
    t = trend([0.60, 0.58, 0.56, 0.54, 0.52])
    assert t["slope"] < 0 and t["p"] < 0.01
    assert trend([0.6, 0.5])["slope"] is None


def test_collapse_levels_direction():
    ref = {"distinct_2": 0.8, "perplexity_heldout": 20.0, "compression_ratio": 2.0}
    cur = {"distinct_2": 0.45, "perplexity_heldout": 21.0, "compression_ratio": 2.1}
    lv = collapse_levels(cur, ref, 0.2)
    assert lv["distinct_2"]["level"] == "alert"  # -44% diversity
    assert lv["perplexity_heldout"]["level"] == "ok" and lv["compression_ratio"]["level"] == "ok"


def test_concealment_flag():
    behav = {"d": {"delta": 0.1, "p_holm": 0.001}, "e": {"delta": 0.1, "p_holm": 0.001}}
    acts = {"d": {"projection_shift": 0.05}, "e": {"projection_shift": -0.6}}
    assert concealment(behav, acts, 0.03, 0.25) == ["d"]
