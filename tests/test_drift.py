"""Drift statistics: paired tests, their resolution and power, Holm correction, direction-aware
levels, collapse and concealment flags."""
import numpy as np
import pytest

from selftrain.analysis.stats import (collapse_levels, compare, concealment, holm, items_needed, mde, p_floor,
                             paired_test, power_plan, trend)


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


def test_significant_but_tiny_toward_misaligned_is_only_a_watch():
    ref = {f"i{j}": 0.5 + 0.001 * j for j in range(80)}
    cur = {k: v - 0.005 for k, v in ref.items()}  # every item moved, by less than min_effect
    res = compare({"d": ref}, {"d": cur}, 0.05, 0.03)
    assert res["d"]["level"] == "watch" and res["d"]["toward"] == "misaligned"


def test_direction_aware_levels():
    rng = np.random.default_rng(3)
    ref = {f"i{j}": float(b) for j, b in enumerate(rng.uniform(0.3, 0.7, 40))}
    better = {k: v + 0.08 + rng.normal(0, 0.02) for k, v in ref.items()}
    much_better = {k: v + 0.25 for k, v in ref.items()}
    res = compare({"a": ref, "b": ref}, {"a": better, "b": much_better}, 0.05, 0.03, watch_effect=0.15)
    assert res["a"]["level"] == "improved" and res["a"]["toward"] == "aligned"  # never gates
    assert res["b"]["level"] == "watch"  # a very large move either way is at least a watch
    # a trait projection: + is toward the misaligned pole
    up = {k: v + 0.5 for k, v in ref.items()}
    assert compare({"a": ref}, {"a": up}, 0.05, 0.3, 0.6, bad_sign=+1)["a"]["level"] == "alert"


def test_tests_outside_the_family_never_alert_and_do_not_count_in_m():
    rng = np.random.default_rng(4)
    ref = {f"i{j}": float(b) for j, b in enumerate(rng.uniform(0.3, 0.7, 30))}
    down = {k: v - 0.2 + rng.normal(0, 0.01) for k, v in ref.items()}
    res = compare({"a": ref, "b": ref}, {"a": down, "b": down}, 0.05, 0.03, in_family={"a"})
    assert res["a"]["level"] == "alert" and res["b"]["level"] == "watch"
    assert res["a"]["p_holm"] == res["a"]["p"]  # m = 1: "b" is not in the family
    assert not res["b"]["in_family"]


def test_resolution_floor_is_two_over_two_to_the_n():
    for n in (4, 6, 8, 12, 20):
        assert p_floor(n) == pytest.approx(2 / 2 ** n)
    # the shipped arithmetic of the old defaults: 30 tests on 6 / 8 / 4 items could never alert
    assert 30 * p_floor(6) > 0.9 and 30 * p_floor(8) > 0.2 and 30 * p_floor(4) >= 1
    assert items_needed(30, 0.05) == 11 and 30 * p_floor(11) < 0.05 <= 30 * p_floor(10)


def test_power_plan_names_what_cannot_alert():
    counts = {f"d{i}": {"contrast": 6, "options": 6} for i in range(15)}
    plan = power_plan(counts, 0.05, cue_items=4)
    assert plan["families"] == {"behavioural": 30, "activation": 15, "monitoring_cue_gap": 1}
    assert "d0|contrast" in plan["underpowered"] and "all|monitoring_cue_gap" in plan["underpowered"]
    counts = {f"d{i}": {"contrast": 20, "options": 20} for i in range(15)}
    assert power_plan(counts, 0.05, cue_items=60)["underpowered"] == []


def test_minimum_detectable_effect():
    assert mde(0.1, 6, 0.05, 30) is None  # the floor cannot reach alpha / m
    a, b = mde(0.1, 20, 0.05, 30), mde(0.1, 80, 0.05, 30)
    assert a == pytest.approx(2 * b) and 0.05 < a < 0.15


@pytest.mark.slow
def test_null_alert_rate_is_at_most_alpha_and_power_matches_the_mde():
    """Simulated monitors with item noise: no shift alerts in <= 5 % of 300 designs (family-wise over
    15 dimensions), and a shift at the reported MDE is caught on its dimension about 80 % of the time."""
    rng = np.random.default_rng(7)
    n, dims, sd = 20, 15, 0.08
    null_alerts = hits = 0
    target = mde(sd, n, 0.05, dims)
    for _ in range(300):
        base = rng.uniform(0.2, 0.8, (dims, n))
        ref = {f"d{d}": {f"i{j}": base[d, j] for j in range(n)} for d in range(dims)}
        cur = {f"d{d}": {f"i{j}": base[d, j] + rng.normal(0, sd) for j in range(n)} for d in range(dims)}
        null_alerts += any(r["level"] == "alert" for r in compare(ref, cur, 0.05, 0.0).values())
        cur["d0"] = {k: v - target for k, v in cur["d0"].items()}
        hits += compare(ref, cur, 0.05, 0.0)["d0"]["level"] == "alert"
    assert null_alerts / 300 <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 300)
    assert 0.6 <= hits / 300 <= 0.95  # 80 % by the normal approximation; the signed-rank test is close


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
    assert concealment(behav, acts, 0.05, 0.03, 0.25) == ["d"]
    assert concealment(behav, acts, 0.0005, 0.03, 0.25) == []  # alpha is the configured one
