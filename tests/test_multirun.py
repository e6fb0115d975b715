"""A Hydra multirun: a job that fails does not stop the others, and the sweep report at the end
lists every job's outcome."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES
from selftrain.run.records import read_json

SELFTRAIN = Path(sys.executable).parent / "selftrain"
SUITE = str(Path(__file__).parent / "data" / "mini_suite")


@pytest.mark.slow  # a sweep of two `selftrain` jobs, one of them a whole run
def test_failed_job_is_listed_and_the_sweep_goes_on(tiny_model, tmp_path):
    sweep = tmp_path / "sweep"
    argv = [str(SELFTRAIN), "-m", *TINY_OVERRIDES, "generations=1", f"probes.suite={SUITE}",
            "probes.max_items_per_dimension=null", "data.max_top_trigram_share=1.0", "monitor.activations=false",
            "monitor.embedding=false", "monitor.collapse=false", "monitor.cue_gap=false",
            f"model.name_or_path='./no-such-model/model','{tiny_model}'", f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=900,
                       env={**env, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("selftrain:")]
    assert any("error: job 0" in line and "./no-such-model/model" in line for line in lines), lines
    # the sweep report: one line per job, named by the override that differs
    assert lines[-3] == "selftrain: sweep of 2 job(s): 1 done, 1 failed", lines
    assert lines[-2].startswith("selftrain:   job 0 (model.name_or_path='./no-such-model/model') in ") and \
        lines[-2].endswith(": failed: model path does not exist: ./no-such-model/model"), lines
    assert lines[-1].startswith(f"selftrain:   job 1 (model.name_or_path='{tiny_model}') in ") and \
        lines[-1].endswith(": done (new run)"), lines
    # the job after the failing one ran to the end
    assert read_json(sweep / "values-seed0-1" / "manifest.json")["status"] == "done"
    assert not (sweep / "values-seed0-0" / "manifest.json").exists()
