"""The smoke experiment on the embedded SmolLM2-135M model, through the real console script.

Asserts what the loop promises, not merely that it finished: three generations on disk,
one training row per kept prompt, gen-001's weights differ from gen-000's, probe results
for every generation and a drift report for each trained one.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

from selftrain.models import embedded_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    exe = Path(sys.executable).parent / "selftrain"
    proc = subprocess.run([str(exe), "experiment=smoke", f"hydra.run.dir={run_dir}"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_smoke_leaves_three_generations(smoke_run):
    run_dir, proc = smoke_run
    assert sorted(p.name for p in run_dir.glob("gen-*")) == ["gen-000", "gen-001", "gen-002"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["generations_done"] == 3
    assert "drift report" in proc.stdout and "gen-002/drift/report.md" in proc.stdout


def test_training_data_one_row_per_kept_prompt(smoke_run):
    run_dir, _ = smoke_run
    for k in (0, 1):
        g = run_dir / f"gen-{k:03d}"
        counts = json.loads((g / "manifest.json").read_text())["stages"]["data"]["counts"]
        assert counts["records"] == 8
        sft, pref = load_from_disk(str(g / "data" / "sft")), load_from_disk(str(g / "data" / "preference"))
        assert len(sft) == len(pref) == counts["kept"] > 0
        assert sorted(sft["prompt_id"]) == sorted(set(sft["prompt_id"]))
        assert all(m[0]["role"] == "user" and m[1]["role"] == "assistant" and m[1]["content"].strip()
                   for m in sft["messages"])


def test_gen1_weights_differ_from_gen0(smoke_run):
    run_dir, _ = smoke_run
    base = load_file(str(embedded_checkpoint() / "model.safetensors"))
    gen1 = load_file(str(run_dir / "gen-001" / "model" / "model.safetensors"))
    assert set(base) == set(gen1)
    moved = [k for k in base if not torch.equal(base[k], gen1[k])]
    assert len(moved) > len(base) // 2
    train = json.loads((run_dir / "gen-000" / "manifest.json").read_text())["stages"]["train"]["counts"]
    assert train["relative_l2"] > 0 and train["last_loss"] is not None


def test_probes_and_reports(smoke_run):
    run_dir, _ = smoke_run
    for k in range(3):
        probes = load_from_disk(str(run_dir / f"gen-{k:03d}" / "probes"))
        assert len(probes) > 0 and all(0.0 <= s <= 1.0 for s in probes["score"])
        assert set(probes["dimension"]) == {"corrigibility", "sycophancy", "harmful_refusal"}  # the smoke monitor
    for k in (1, 2):
        rep = json.loads((run_dir / f"gen-{k:03d}" / "drift" / "report.json").read_text())
        assert rep["generations"] == [f"gen-{j:03d}" for j in range(k + 1)]
        for dim in rep["dimensions"].values():
            assert all(f"gen-{j:03d}" in dim for j in range(k + 1))
            assert dim[f"gen-{k:03d}"]["contrast"]["vs_reference"]["n"] > 0
        assert all(a["candidate"] == f"gen-{k:03d}" for a in rep["alerts"])
        for name in ("report.md", "report.html"):
            assert (run_dir / f"gen-{k:03d}" / "drift" / name).is_file()
    assert (run_dir / "index.html").is_file()
