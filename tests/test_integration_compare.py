"""A smoke sweep (rules and values arms, one seed, one trained generation) on the embedded model
through the real `selftrain -m` console script, then `selftrain-compare` on the sweep folder.

Asserts that both arms appear with their own job folders, that the comparison's numbers are the
per-item probe scores read back from disk (difference = mean of per-item differences; swapping
the arm labels flips its sign), and that re-running the same sweep skips the finished jobs.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selftrain.analysis.compare import compare_runs
from selftrain.analysis.stats import load_probe_table

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
SWEEP = ["-m", "experiment=smoke", "generations=1", "constitution=rules,values", "seed=0"]


def _run(args, timeout):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("compare") / "sweep"
    proc = _run([BIN / "selftrain", *SWEEP, f"hydra.sweep.dir={sweep_dir}"], timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_sweep_job_folders_record_arm_and_seed(sweep):
    assert sorted(p.name for p in sweep.iterdir() if (p / "manifest.json").is_file()) == \
        ["rules-seed0-0", "values-seed0-1"]
    for name, arm in (("rules-seed0-0", "rules"), ("values-seed0-1", "values")):
        m = json.loads((sweep / name / "manifest.json").read_text())
        assert m["status"] == "done" and m["constitution"]["name"] == arm and m["seeds"]["seed"] == 0


def test_compare_reports_both_arms_from_item_scores(sweep):
    proc = _run([BIN / "selftrain-compare", sweep], timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "comparison.md" in proc.stdout
    c = json.loads((sweep / "comparison.json").read_text())
    assert c["arms"] == ["values", "rules"] and c["final_generation"] == 1
    # one seed per arm: nothing can be called either way, and the report says how many seeds would do
    assert c["verdict"]["pairs"][0]["result"] == "inconclusive (design cannot reach alpha)"
    assert c["design"]["seeds_needed_floor"] >= 5  # smoke's 3 dimensions: 3 x 2 / C(2r, r) < 0.05 needs r >= 5
    for arm in ("values", "rules"):
        f = c["fairness"][arm]
        assert f["context_tokens"] > 0 and f["fewshot_tokens"] > 0
    assert c["fairness"]["values"]["context"] == ["document"] and c["fairness"]["rules"]["context"] == ["section"]
    assert c["fairness"]["values"]["fewshot_prompts_sha256"] == c["fairness"]["rules"]["fewshot_prompts_sha256"]
    assert c["fairness"]["values"]["context_tokens"] > c["fairness"]["rules"]["context_tokens"]
    (pair,) = compare_runs([sweep], items="all")["differences"]
    tv = load_probe_table(sweep / "values-seed0-1" / "gen-001" / "probes")["scores"]
    tr = load_probe_table(sweep / "rules-seed0-0" / "gen-001" / "probes")["scores"]
    assert set(pair["dimensions"]) == set(tr) and len(tr) == 3  # the smoke experiment probes 3 dimensions
    for d, r in pair["dimensions"].items():
        assert r["diff"] == pytest.approx(np.mean([tv[d][i] - tr[d][i] for i in tr[d]]), abs=1e-9)
        assert r["ci95"] is None and r["p"] == 1.0
    # gen-000 is the same base model in both arms: identical per-item scores
    t0v = load_probe_table(sweep / "values-seed0-1" / "gen-000" / "probes")["scores"]
    t0r = load_probe_table(sweep / "rules-seed0-0" / "gen-000" / "probes")["scores"]
    assert t0v == t0r
    assert c["verdict"]["pairs"][0]["n_seeds"] == 1
    assert sorted(c["novel"]["dimensions"]) == sorted(d for d, f in c["families"].items() if f == "novel")
    for arm in ("values", "rules"):
        assert c["training_data"][arm]["records"] == 8 and c["compute"][arm]["seconds_total"] > 0
        used = c["training_data"][arm]["principle_usage"]
        assert sum(used.values()) == 8
    assert "values" in (sweep / "comparison.html").read_text()


def test_swapping_labels_flips_the_sign(sweep, tmp_path):
    before = compare_runs([sweep])["differences"][0]["dimensions"]
    for src, arm in (("rules-seed0-0", "values"), ("values-seed0-1", "rules")):
        dst = tmp_path / src
        shutil.copytree(sweep / src, dst, ignore=shutil.ignore_patterns("model"))
        m = json.loads((dst / "manifest.json").read_text())
        m["constitution"]["name"] = m["config"]["constitution"]["name"] = arm
        (dst / "manifest.json").write_text(json.dumps(m))
    after = compare_runs([tmp_path])["differences"][0]["dimensions"]
    for d, r in before.items():
        assert after[d]["diff"] == pytest.approx(-r["diff"], abs=1e-12)


def test_rerun_skips_finished_jobs(sweep):
    stamps = {p.name: json.loads((p / "gen-000" / "manifest.json").read_text())["stages"]["probe"]["finished"]
              for p in sweep.glob("*-seed0-*")}
    proc = _run([BIN / "selftrain", *SWEEP, f"hydra.sweep.dir={sweep}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run finished") == 2
    for p in sweep.glob("*-seed0-*"):
        assert json.loads((p / "gen-000" / "manifest.json").read_text())["stages"]["probe"]["finished"] == \
            stamps[p.name]
