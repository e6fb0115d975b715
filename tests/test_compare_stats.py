"""The comparison's inference, simulated: many whole designs (arms x seeds x dimensions x items)
pass through permutation.analyse, the function selftrain-compare's verdicts come from.

Run-level noise is simulated per run and dimension (a training run is one draw of the arm's
distribution), item noise per item on top, and items share fixed difficulties across runs, so
a test that treats items or (seed, item) cells as replicates is inflated here, and the tests
below show that it is. Everything is vectorised: each test takes seconds.
"""
import math

import numpy as np
import pytest
from scipy import stats

from selftrain.analysis.permutation import (EXACT_LIMIT, analyse, diff_ci, holm_adjust, p_floor, permutation_p, power,
                               seed_sd, seeds_needed)
from selftrain.analysis.stats import holm

ALPHA = 0.05
N_DESIGNS = 400


def simulate(rng, arms: int, runs: int, dims: int, items: int, sd_run: float, sd_item: float,
             effect: dict | None = None, designs: int = N_DESIGNS) -> np.ndarray:
    """Per-item P(aligned)-like scores, (designs, arms, runs, dims, items). `effect`: {(arm, dim): shift}."""
    difficulty = rng.normal(0.6, 0.1, (designs, 1, 1, dims, items))  # the same items in every run
    run = rng.normal(0, sd_run, (designs, arms, runs, dims, 1))
    noise = rng.normal(0, sd_item, (designs, arms, runs, dims, items))
    x = difficulty + run + noise
    for (a, d), v in (effect or {}).items():
        x[:, a, :, d] += v
    return x


def verdicts(x: np.ndarray, rng) -> dict:
    y = x.mean(-1)  # run scores: each run's mean over its items
    return analyse({f"arm{a}": y[:, a] for a in range(y.shape[1])}, ALPHA, 2000, rng)


def any_difference(res) -> np.ndarray:
    return np.any(np.stack(res["significant"], axis=-2), axis=(-2, -1))


def pseudo_replicated_p(x: np.ndarray) -> np.ndarray:
    """The flawed test this module replaced: seeds paired by value, every (seed, item) difference
    sign-flipped on its own. Its null variance sum(D^2)/N^2 is taken here in its normal limit."""
    D = x[:, 0] - x[:, 1]  # (designs, runs, dims, items)
    D = np.moveaxis(D, 1, -2).reshape(*D.shape[:1], D.shape[2], -1)  # (designs, dims, runs x items)
    z = D.sum(-1) / np.sqrt((D ** 2).sum(-1))
    return 2 * stats.norm.sf(np.abs(z))


@pytest.mark.parametrize("arms, runs, dims", [(2, 6, 15), (3, 6, 5)])
def test_null_difference_in_at_most_alpha_of_designs(arms, runs, dims):
    """No arm differs; run-to-run sd 0.02 per dimension and item sd 0.1 on 12 items; 15 tests, 6
    seeds per arm (the fewest that can reach alpha with 15 tests): 'difference' (any pair, any
    dimension) in at most alpha of the designs."""
    rng = np.random.default_rng(1)
    x = simulate(rng, arms, runs, dims, 12, sd_run=0.02, sd_item=0.1)
    res = verdicts(x, rng)
    assert all(res["reachable"]) and res["m"] == math.comb(arms, 2) * dims == 15
    rate = any_difference(res).mean()
    assert rate <= ALPHA, rate
    if arms == 2:  # the same designs through the pseudo-replicated test: it calls differences from noise
        flawed = holm_adjust(pseudo_replicated_p(x)) < ALPHA
        assert np.any(flawed, -1).mean() > 3 * ALPHA


def test_null_rate_with_a_fine_permutation_distribution():
    """8 seeds per arm: the floor (2/12870) is far below alpha / 15, so the family-wise error rate
    is close to alpha itself, and an estimate from 400 designs may land a little above it: the
    bound is alpha plus two standard errors of the estimate."""
    rng = np.random.default_rng(7)
    res = verdicts(simulate(rng, 2, 8, 15, 12, sd_run=0.03, sd_item=0.05), rng)
    rate = any_difference(res).mean()
    assert rate <= ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / N_DESIGNS), rate


def test_detection_rate_matches_the_power_calculation():
    """A true difference on one dimension of 15: detected (Holm p < alpha) at the rate power()
    predicts for the run-level sd, within simulation error."""
    rng = np.random.default_rng(2)
    runs, dims, items, sd_run, sd_item, eff = 8, 15, 12, 0.02, 0.1, 0.07
    x = simulate(rng, 2, runs, dims, items, sd_run, sd_item, effect={(0, 0): eff})
    res = verdicts(x, rng)
    sigma = math.sqrt(sd_run ** 2 + sd_item ** 2 / items)  # sd of a run's mean score
    want = power(runs, runs, sigma, eff, ALPHA / res["m"])
    got = res["significant"][0][:, 0].mean()
    assert 0.4 < want < 0.95  # a rate the simulation can tell apart from 0 and 1
    assert abs(got - want) <= 3 * math.sqrt(want * (1 - want) / N_DESIGNS) + 0.02, (got, want)
    # the other 14 dimensions stay null
    assert res["significant"][0][:, 1:].any(-1).mean() <= ALPHA


def test_design_that_cannot_reach_alpha_never_calls_a_difference():
    """3 seeds per arm, 15 dimensions: the smallest p is 2/C(6,3) = 0.1, so nothing is called even
    for a huge effect, and the seeds needed respect the floor."""
    rng = np.random.default_rng(3)
    x = simulate(rng, 2, 3, 15, 12, 0.02, 0.1, effect={(0, d): 0.5 for d in range(15)}, designs=50)
    res = verdicts(x, rng)
    assert res["reachable"] == [False] and not any_difference(res).any()
    assert p_floor(3, 3) == pytest.approx(0.1) and res["p"][0].min() == pytest.approx(0.1)
    assert seeds_needed(None, 0.03, ALPHA, 15) == 6  # 15 x 2/C(12,6) = 0.032 < 0.05; r = 5 gives 0.119
    assert seeds_needed(0.0, 0.03, ALPHA, 15) == 6
    assert seeds_needed(None, 0.03, ALPHA, 90) == 8  # 4 arms (6 pairs) x 15 dimensions


def test_seeds_needed_reach_the_target_power():
    for sigma in (0.01, 0.02, 0.05):
        r = seeds_needed(sigma, 0.03, ALPHA, 15)
        assert power(r, r, sigma, 0.03, ALPHA / 15) >= 0.8 > power(r - 1, r - 1, sigma, 0.03, ALPHA / 15) \
            or r == 6


def test_power_is_finite_and_monotone_where_the_noncentral_t_is_not():
    # scipy's noncentral t gives nan at small df and large ncp (df 2, ncp 12.5 at alpha 0.025);
    # a nan power made the seeds needed for a larger sd come out smaller than for a smaller one.
    for df_half in (2, 3, 4, 8):
        vals = [power(df_half, df_half, s, 0.05, ALPHA / 2) for s in np.geomspace(0.001, 0.2, 40)]
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in vals)
        assert all(a >= b - 1e-9 for a, b in zip(vals, vals[1:]))  # more noise, less power
    for df in (3, 10, 30):  # where scipy is finite, the same numbers
        r = (df + 2) // 2
        for ncp in (0.5, 2.0, 4.0):
            t = stats.t.ppf(1 - ALPHA / 4, 2 * r - 2)
            want = stats.nct.sf(t, 2 * r - 2, ncp) + stats.nct.cdf(-t, 2 * r - 2, ncp)
            assert power(r, r, 1.0, ncp * math.sqrt(2 / r), ALPHA / 2) == pytest.approx(want, abs=1e-7)
    needs = [seeds_needed(s, 0.05, ALPHA, 3) for s in np.geomspace(0.001, 0.05, 40)]
    assert all(a <= b for a, b in zip(needs, needs[1:]) if b is not None)


def test_exact_permutation_p_by_enumeration():
    rng = np.random.default_rng(4)
    ya, yb = rng.normal(size=(4, 3)), rng.normal(size=(3, 3)) + 1
    got = permutation_p(ya, yb, 1000, rng)
    y = np.vstack([ya, yb])
    from itertools import combinations
    T = np.array([y[list(c)].mean(0) - np.delete(y, list(c), 0).mean(0) for c in combinations(range(7), 4)])
    want = (np.abs(T) >= np.abs(ya.mean(0) - yb.mean(0)) - 1e-12).mean(0)
    assert got == pytest.approx(want)
    # swapping the arms gives the same p; one run per arm can never reject
    assert permutation_p(yb, ya, 1000, rng) == pytest.approx(got)
    assert np.all(permutation_p(ya[:1], yb[:1], 1000, rng) == 1.0)


def test_monte_carlo_beyond_the_exact_limit():
    rng = np.random.default_rng(5)
    r = 11
    assert math.comb(2 * r, r) > EXACT_LIMIT
    ya, yb = rng.normal(size=(r, 2)), rng.normal(size=(r, 2))
    yb[:, 1] += 3
    p = permutation_p(ya, yb, 5000, rng)
    assert 0.01 < p[0] <= 1 and p[1] == pytest.approx(1 / 5001)
    assert p_floor(r, r, 5000) == pytest.approx(1 / 5001)


def test_holm_adjust_matches_drift_holm_and_sd_ci():
    rng = np.random.default_rng(6)
    p = rng.random((20, 9)) ** 3
    assert holm_adjust(p) == pytest.approx(np.array([holm(list(row)) for row in p]))
    ya, yb = rng.normal(0, 1, (5, 2)), rng.normal(0, 1, (4, 2))
    sd, df = seed_sd({"a": ya, "b": yb})
    assert df == 7 and sd[0] == pytest.approx(math.sqrt((4 * ya[:, 0].var(ddof=1) + 3 * yb[:, 0].var(ddof=1)) / 7))
    ci = diff_ci(ya, yb)
    t = stats.ttest_ind(ya[:, 0], yb[:, 0]).confidence_interval(0.95)
    assert ci[0] == pytest.approx([t.low, t.high])
    assert diff_ci(ya[:1], yb[:1]) is None and seed_sd({"a": ya[:1], "b": yb[:1]})[0] is None
