"""The steering check on the tiny random model: a direction built into the model moves its
dimension's score and is marked causal; a random direction is marked not_causal; the hook
leaves the model as it was."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import MINI_SUITE
from selftrain.monitor.behavioural import score_suite
from selftrain.monitor.steering import slope_ci, steered, steering_check
from selftrain.monitor.suites import load_suite

DIM = "corrigibility"


@pytest.fixture(scope="module")
def setup(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    suite = load_suite(MINI_SUITE)
    base = {r["item_id"]: r["score"] for r in score_suite(model, tok, suite) if r["kind"] == "contrast"}
    return model, tok, suite, base


def built_in_direction(model, tok, suite) -> np.ndarray:
    """At the final norm's output the logits are W h: adding the mean unembedding row of the
    misaligned replies' tokens minus that of the aligned replies' raises the misaligned replies'
    log-likelihood, so this direction is causal for the dimension by construction."""
    W = model.get_output_embeddings().weight.detach().numpy().astype(np.float64)
    items = [it for it in suite.items if it.dimension == DIM and it.kind == "contrast"]
    mis = np.concatenate([tok(it.misaligned, add_special_tokens=False)["input_ids"] for it in items])
    ali = np.concatenate([tok(it.aligned, add_special_tokens=False)["input_ids"] for it in items])
    v = W[mis].mean(0) - W[ali].mean(0)
    return v / np.linalg.norm(v)


def frozen(model, v, gap=40.0):
    return {DIM: {"layer": model.config.num_hidden_layers, "direction": v.astype(np.float32), "gap": gap}}


def test_a_built_in_direction_is_causal_and_a_random_one_is_not(setup):
    model, tok, suite, base = setup
    v = built_in_direction(model, tok, suite)
    got = steering_check(model, tok, suite, frozen(model, v), [-2, -1, 1, 2], base, min_effect=0.05)[DIM]
    assert got["causal"] and got["ci"][1] < 0 and got["change"] >= 0.05, got
    assert got["alphas"] == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert got["mean_score"][0] > got["mean_score"][2] > got["mean_score"][-1]  # adding the trait lowers P(aligned)
    # the same strength along random directions moves the score less than min_effect: not causal
    rng = np.random.default_rng(0)
    for _ in range(3):
        r = rng.normal(size=v.shape)
        r -= (r @ v) * v  # nothing of the built-in direction in it
        res = steering_check(model, tok, suite, frozen(model, r / np.linalg.norm(r)), [-2, -1, 1, 2], base,
                             min_effect=0.05)[DIM]
        assert not res["causal"] and abs(res["change"]) < got["change"] / 3, res
    # the reverse of a causal direction moves the score the wrong way: not causal either
    rev = steering_check(model, tok, suite, frozen(model, -v), [-2, -1, 1, 2], base, min_effect=0.05)[DIM]
    assert not rev["causal"] and rev["slope"] > 0


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_the_hook_adds_where_the_hidden_state_is_read_and_is_removed(setup, layer):
    """hidden_states[layer] is what the next module reads (decoder layer `layer`, or the LM head
    after the last): steering must change exactly that, by the vector, at every position."""
    model, tok, _, _ = setup
    ids = torch.tensor([tok("We plan to shut you down tonight.")["input_ids"]])
    layers = model.model.layers
    consumer = layers[layer] if layer < len(layers) else model.get_output_embeddings()
    seen = []
    handle = consumer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            plain = model(ids, output_hidden_states=True).hidden_states
            vec = np.zeros(model.config.hidden_size)
            vec[3] = 5.0
            with steered(model, layer, vec):
                model(ids)
            model(ids)
    finally:
        handle.remove()
    before, moved, after = seen
    assert torch.allclose(before, plain[layer], atol=1e-6)  # the consumer reads hidden_states[layer]
    delta = (moved - before)[0]
    assert torch.allclose(delta[:, 3], torch.full_like(delta[:, 3], 5.0), atol=1e-4)
    assert torch.allclose(delta[:, :3], torch.zeros_like(delta[:, :3]), atol=1e-5)
    assert torch.equal(before, after)  # the hook is gone


def test_slope_ci_recovers_a_known_slope():
    rng = np.random.default_rng(1)
    alphas = [-2, -1, 0, 1, 2]
    scores = 0.5 - 0.03 * np.array(alphas)[None, :] + rng.normal(0, 0.002, (20, 5))
    fit = slope_ci(alphas, scores)
    assert fit["ci"][0] < -0.03 < fit["ci"][1] and fit["n"] == 20
    flat = slope_ci(alphas, 0.5 + rng.normal(0, 0.01, (20, 5)))
    assert flat["ci"][0] < 0 < flat["ci"][1]
