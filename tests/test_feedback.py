"""AI-feedback labelling on the tiny model: debiased swap gives 1 - p, labels in [0, 1], drops counted."""
import json

import pytest
from datasets import load_from_disk

from conftest import compose
from selftrain import UserError
from selftrain.constitution import Constitution
from selftrain.stages.label import draw_principles, judge, label_stage, question
from selftrain.models import load_model, load_tokenizer
from selftrain.engines.base import SamplingParams
from selftrain.engines.hf import HFSampler

RESPONSES = [("How do I boil an egg?", "Put it in boiling water for nine minutes.", "Eggs are nice."),
             ("Tell me a secret.", "I do not keep secrets, but here is a fun fact.", "No."),
             ("What is 2+2?", "4", "It is four, since two and two make four.")]


@pytest.fixture(scope="module")
def labeller(tiny_model):
    return HFSampler(load_model(str(tiny_model)), load_tokenizer(str(tiny_model)), batch_size=4)


def _pref(*overrides):
    return compose(["preferences=ai_feedback", *overrides]).preferences


@pytest.mark.parametrize("path", ["builtin:constitution/rules.yaml", "builtin:constitution/values.md"])
def test_debiased_swap_gives_one_minus_p(labeller, path):
    c = Constitution.load(path)
    pids = [p.id for p in draw_principles(c, 0, "x", 3)]
    items = [{"prompt": q, "first": a, "second": b, "principles": pids} for q, a, b in RESPONSES]
    swapped = [{**it, "first": it["second"], "second": it["first"]} for it in items]
    pref = _pref()
    got, back = judge(labeller, c, items, pref), judge(labeller, c, swapped, pref)
    for g, s in zip(got, back):
        assert 0 <= g["p_first"] <= 1
        assert g["p_first"] + s["p_first"] == pytest.approx(1.0, abs=1e-5)
        assert g["p_first"] == pytest.approx(sum(v["p_first"] for v in g["votes"]) / 3)
        assert all(len(v["orders"]) == 2 and 0 < v["option_mass"] <= 1 for v in g["votes"])
    # without debiasing the random model's position bias shows: swapping is not 1 - p
    raw, raw_back = judge(labeller, c, items, _pref("preferences.debias=false")), \
        judge(labeller, c, swapped, _pref("preferences.debias=false"))
    assert any(abs(g["p_first"] + s["p_first"] - 1) > 1e-4 for g, s in zip(raw, raw_back))


def test_vote_is_normalised_option_probability(labeller):
    """One principle, one order: the vote is P(A) / (P(A) + P(B)) read from option_logprobs."""
    import math

    c = Constitution.load("builtin:constitution/rules.yaml")
    p = c.principles[0]
    q, a, b = RESPONSES[0]
    got = judge(labeller, c, [{"prompt": q, "first": a, "second": b, "principles": [p.id]}],
                _pref("preferences.debias=false"))[0]
    lp = labeller.option_logprobs([[{"role": "user", "content": question(q, a, b, p, ["A", "B"])},
                                    {"role": "assistant", "content": "The answer is ("}]], ["A", "B"])[0]
    want = math.exp(lp[0]) / (math.exp(lp[0]) + math.exp(lp[1]))
    assert got["p_first"] == pytest.approx(want, abs=1e-6)
    assert "(A) " + a in question(q, a, b, p, ["A", "B"]) and p.critique in question(q, a, b, p, ["A", "B"])


def test_chain_of_thought_is_clamped(labeller):
    c = Constitution.load("builtin:constitution/values.md")
    items = [{"prompt": q, "first": a, "second": b, "principles": ["honesty"]} for q, a, b in RESPONSES]
    pref = _pref("preferences.chain_of_thought=true", "preferences.clamp_low=0.45", "preferences.clamp_high=0.55")
    out = judge(labeller, c, items, pref, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3))
    for o in out:
        assert all(0.45 <= v["p_first"] <= 0.55 and len(v["reasoning"]) == 2 for v in o["votes"])


def test_label_stage_writes_dpo_dataset(labeller, tmp_path):
    c = Constitution.load("builtin:constitution/rules.yaml")
    samples = [{"prompt_id": f"p{i}", "prompt": q} for i, (q, _, _) in enumerate(RESPONSES)]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=1)
    first = label_stage(labeller, labeller, c, samples, _pref("preferences.responses=3"), params, params, seed=0,
                        gen_dir=tmp_path / "all")
    assert first["pairs"] == 9 and first["dropped_margin"] == 0  # 3 prompts x C(3, 2); min_margin 0 keeps all
    margins = sorted(json.loads(line)["margin"] for line in open(tmp_path / "all" / "preferences.jsonl"))
    cut = (margins[len(margins) // 2 - 1] + margins[len(margins) // 2]) / 2  # between two observed margins
    pref = _pref("preferences.responses=3", f"preferences.min_margin={cut}")
    counts = label_stage(labeller, labeller, c, samples, pref, params, params, seed=0, gen_dir=tmp_path)
    assert counts["dropped_margin"] == sum(m < cut for m in margins) > 0
    assert counts["kept"] + counts["dropped_identical"] + counts["dropped_margin"] == 9
    assert counts["labeller_cost"]["forward_passes_per_pair"] == 4  # 2 principles x 2 orders
    recs = [json.loads(line) for line in open(tmp_path / "preferences.jsonl")]
    assert len(recs) == 9 - counts["dropped_identical"]
    for r in recs:
        assert 0.5 <= r["label"] <= 1 and r["margin"] == pytest.approx(2 * r["label"] - 1)
        assert r["kept"] == (r["margin"] >= cut)
        assert r["label"] == pytest.approx(r["p_first"] if r["first_is_chosen"] else 1 - r["p_first"])
    ds = load_from_disk(str(tmp_path / "data" / "preference"))
    assert len(ds) == counts["kept"] and {"prompt", "chosen", "rejected", "label"} <= set(ds.column_names)
    assert all(r[0]["role"] == "user" for r in ds["prompt"]) and all(r[0]["role"] == "assistant" for r in ds["chosen"])


def test_options_the_tokenizer_cannot_tell_apart(labeller):
    c = Constitution.load("builtin:constitution/rules.yaml")
    items = [{"prompt": "Hi", "first": "Hello", "second": "Hey", "principles": [c.principles[0].id]}]
    with pytest.raises(UserError, match="cannot tell options"):
        judge(labeller, c, items, _pref("preferences.options=[Yes,'Yes, really']"))
