"""The loop with train=dpo and preferences=ai_feedback on the tiny model: nothing reads revisions,
so there is no critique or data stage; the label stage runs after sampling and before the guard,
DPO trains the next generation, and the report reads it all back."""
import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES, compose
from selftrain.run.loop import run

SUITE = str(Path(__file__).parent / "data" / "mini_suite")


@pytest.fixture(scope="module")
def dpo_run(tiny_model, tmp_path_factory):
    cfg = compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}", f"probes.suite={SUITE}",
                                    "probes.max_items_per_dimension=null", "data.max_top_trigram_share=1.0",
                                    "generations=1", "train=dpo", "preferences=ai_feedback",
                                    "preferences.responses=3", "train.dpo.learning_rate=1e-2",
                                    "train.dpo.per_device_train_batch_size=4", "sampler.temperature=1.0"])
    run_dir = tmp_path_factory.mktemp("dpo-run")
    return cfg, run_dir, run(cfg, run_dir)


def test_label_stage_between_sample_and_guard(dpo_run):
    _, run_dir, manifest = dpo_run
    assert manifest["status"] == "done"
    g0 = json.loads((run_dir / "gen-000" / "manifest.json").read_text())
    order = list(g0["stages"])
    assert order.index("sample") < order.index("label") < order.index("guard") < order.index("train")
    # DPO on labelled pairs reads no revisions: no critique pass was spent on them
    assert "critique" not in order and "data" not in order
    assert not (run_dir / "gen-000" / "critiques.jsonl").exists()
    label = g0["stages"]["label"]["counts"]
    assert label["pairs"] == 8 * 3 and label["kept"] > 0
    assert label["labeller"]["source"] == "model k (gen-000)" and len(label["labeller"]["sha256"]) == 64
    assert label["labeller_cost"]["forward_passes_per_pair"] == 2 * 2  # 2 principles x 2 orders
    # the guard checked the AI-feedback pairs, which replaced the revision pairs
    pref = load_from_disk(str(run_dir / "gen-000" / "data" / "preference"))
    assert len(pref) == label["kept"] and all(0.5 <= x <= 1 for x in pref["label"])
    assert not (run_dir / "gen-000" / "data" / "sft").exists()
    assert g0["stages"]["guard"]["counts"]["texts_checked"] == 3 * len(pref)


def test_dpo_trained_gen1_from_gen0(dpo_run, tiny_model):
    _, run_dir, _ = dpo_run
    g0 = json.loads((run_dir / "gen-000" / "manifest.json").read_text())
    train = g0["stages"]["train"]["counts"]
    assert train["method"] == "dpo" and train["reference"] == str(tiny_model) and train["rows"] > 0
    before = load_file(str(Path(tiny_model) / "model.safetensors"))
    after = load_file(str(run_dir / "gen-001" / "model" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before) and train["relative_l2"] > 0
    assert train["reward_accuracy_mean"] is not None and 0 <= train["reward_accuracy_mean"] <= 1


def test_report_reads_preferences_and_dpo_logs(dpo_run):
    _, run_dir, _ = dpo_run
    rep = json.loads((run_dir / "gen-001" / "drift" / "report.json").read_text())
    (t,) = rep["training"]
    label = json.loads((run_dir / "gen-000" / "manifest.json").read_text())["stages"]["label"]["counts"]
    assert t["from"] == "gen-000" and t["method"] == "dpo"
    assert t["preferences"]["kept"] == label["kept"] and sum(t["preferences"]["margin_histogram"]) == \
        label["pairs"] - label["dropped_identical"]
    logs = json.loads((run_dir / "gen-000" / "train" / "train_log.json").read_text())
    assert t["dpo"]["reward_margins"] == [r["rewards/margins"] for r in logs if "rewards/margins" in r]
    md = (run_dir / "gen-001" / "drift" / "report.md").read_text()
    html = (run_dir / "gen-001" / "drift" / "report.html").read_text()
    assert "How each generation was trained" in md and "gen-000 → gen-001" in md
    assert "label margins" in html and "DPO (dpo)" in html
