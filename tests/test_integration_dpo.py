"""`selftrain experiment=smoke train=dpo preferences=ai_feedback` on the embedded SmolLM2-135M model,
through the real console script (one generation and only the behavioural probes, to keep it a few minutes).

Asserts the preference-training promises: soft labels in [0, 1]; asking the labeller again with
the two responses swapped gives 1 - p (position debiasing on); DPO changed the weights; the
labeller and its cost are in the manifest.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from selftrain.constitution import Constitution
from selftrain.stages.label import judge
from selftrain.models import embedded_checkpoint, load_model, load_tokenizer
from selftrain.engines.hf import HFSampler

pytestmark = pytest.mark.integration
# The monitor is not under test here: behavioural probes only, two items per dimension.
ARGS = ["experiment=smoke", "train=dpo", "preferences=ai_feedback", "generations=1", "monitor.activations=false",
        "monitor.embedding=false", "monitor.collapse=false", "monitor.cue_gap=false",
        "probes.max_items_per_dimension=2", "monitor.allow_underpowered=true"]


@pytest.fixture(scope="module")
def dpo_smoke(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke-dpo") / "run"
    exe = Path(sys.executable).parent / "selftrain"
    proc = subprocess.run([str(exe), *ARGS, f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _records(run_dir):
    return [json.loads(line) for line in open(run_dir / "gen-000" / "preferences.jsonl")]


def test_soft_labels_in_unit_interval(dpo_smoke):
    recs = _records(dpo_smoke)
    assert recs
    for r in recs:
        assert 0 <= r["p_first"] <= 1 and 0.5 <= r["label"] <= 1 and 0 <= r["margin"] <= 1
        assert all(0 <= v["p_first"] <= 1 and len(v["orders"]) == 2 for v in r["votes"])


def test_swapping_responses_gives_one_minus_p(dpo_smoke):
    recs = _records(dpo_smoke)
    cfg = compose(ARGS)
    constitution = Constitution.load(cfg.constitution.path)
    path = str(embedded_checkpoint())  # gen-000 labelled its own samples
    labeller = HFSampler(load_model(path), load_tokenizer(path), batch_size=cfg.preferences.batch_size)
    swapped = []
    for r in recs:
        first, second = (r["chosen"], r["rejected"]) if r["first_is_chosen"] else (r["rejected"], r["chosen"])
        swapped.append({"prompt": r["prompt"][0]["content"], "first": second[0]["content"],
                        "second": first[0]["content"], "principles": [v["principle"] for v in r["votes"]]})
    again = judge(labeller, constitution, swapped, cfg.preferences)
    for r, s in zip(recs, again):
        assert s["p_first"] == pytest.approx(1 - r["p_first"], abs=1e-4)


def test_dpo_changed_the_weights_and_cost_is_recorded(dpo_smoke):
    g0 = json.loads((dpo_smoke / "gen-000" / "manifest.json").read_text())
    label, train = g0["stages"]["label"]["counts"], g0["stages"]["train"]["counts"]
    assert label["labeller"]["source"] == "model k (gen-000)"
    assert label["labeller_cost"]["forward_passes_per_pair"] == 4 and label["kept"] > 0
    assert train["method"] == "dpo" and train["relative_l2"] > 0
    base = load_file(str(embedded_checkpoint() / "model.safetensors"))
    gen1 = load_file(str(dpo_smoke / "gen-001" / "model" / "model.safetensors"))
    assert len([k for k in base if not torch.equal(base[k], gen1[k])]) > len(base) // 2
    rep = json.loads((dpo_smoke / "gen-001" / "drift" / "report.json").read_text())
    assert rep["training"][0]["dpo"]["reward_margins"]
