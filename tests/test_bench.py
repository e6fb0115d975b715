"""The benchmark runner works end to end in quick mode and writes every section. Benchmarks
are not tests: nothing here asserts a timing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # every benchmark arm and a smoke run, in a subprocess
def test_quick_benchmark_writes_every_section(tiny_model, tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out),
                           "--model", str(tiny_model)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    for sec in ("hardware", "sampling", "critique", "sft", "smoke", "targets"):
        assert sec in res, sec
    assert res["hardware"]["copy"]["gb_per_s"] > 0 and res["hardware"]["matmul"]["gflop_per_s"] > 0
    assert res["hardware"]["roofline"]["roofline_tok_s"] > 0
    # the target's roofline is measured around the pipeline arm
    assert res["sampling"]["arms"]["pipeline"]["matmul_gflop_per_s_around"] > 0
    assert res["targets"]["sampling_of_roofline"]["value"] == res["hardware"]["pipeline_sampling_of_roofline_around"] > 0
    arms = res["sampling"]["arms"]
    assert {"pipeline", "bare_batched_generate", "one_at_a_time", "pipeline_no_prefix_cache",
            "pipeline_whole_batch_prefill"} <= set(arms)
    assert all(arms[a]["new_tokens"] > 0 for a in ("pipeline", "bare_batched_generate", "one_at_a_time"))
    crit = res["critique"]["arms"]
    assert crit["prefix_cache"]["prefix_tokens_reused"] > 0 and crit["no_prefix_cache"]["prefix_tokens_reused"] == 0
    assert res["sft"]["arms"]["pipeline"]["steps"] == res["sft"]["arms"]["bare_sfttrainer"]["steps"] > 0
    smoke = res["smoke"]
    assert smoke["returncode"] == 0, smoke.get("error")
    assert smoke["peak_rss_mib"] > 0 and set(smoke["generations"]) == {"gen-000", "gen-001"}
    gen0 = smoke["generations"]["gen-000"]["stages"]
    assert gen0["sample"]["new_tokens"] > 0 and gen0["critique"]["new_tokens"] > 0
    assert 0 < smoke["monitor_fraction_of_generation"] < 1
    assert 0 < smoke["screen_fraction_of_generation"] < smoke["monitor_fraction_of_generation"]
    assert smoke["steering_s"] > 0 and gen0["screen"]["seconds"] > 0
    assert set(res["targets"]) == {"sampling_vs_bare_batched", "sampling_vs_one_at_a_time", "sampling_of_roofline",
                                   "monitor_fraction", "screen_fraction", "sft_vs_bare"}
    md = (out / "results.md").read_text()
    for heading in ("## Targets", "## Hardware", "## Sampling", "## Critique and revision", "## SFT",
                    "## Smoke experiment"):
        assert heading in md


def test_gpucheck_random_model_loads(tiny_model, tmp_path):
    """benchmarks.gpucheck builds its stand-in model from a config and tokenizer folder alone."""
    import torch

    from benchmarks import gpucheck
    from selftrain.models import load_model, load_tokenizer

    folder = tmp_path / "config-only"
    folder.mkdir()
    for f in tiny_model.iterdir():
        if not f.name.endswith(".safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    out = gpucheck.random_model(folder, tmp_path / "random")
    model, tok = load_model(str(out)), load_tokenizer(str(out))
    assert model.config.hidden_size == load_model(str(tiny_model)).config.hidden_size
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    if not torch.cuda.is_available():
        assert gpucheck.main(["--model", str(out), "--out", str(tmp_path / "gc")]) == 2
