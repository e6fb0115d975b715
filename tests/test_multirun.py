"""A Hydra multirun: a job that fails does not stop the others, and is listed at the end."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_OVERRIDES
from selftrain.records import read_json

SELFTRAIN = Path(sys.executable).parent / "selftrain"
SUITE = str(Path(__file__).parent / "data" / "mini_suite")


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
    assert "1 job(s) of the multirun failed" in p.stderr and lines[-1].startswith("selftrain:   job 0"), lines
    # the job after the failing one ran to the end
    assert read_json(sweep / "values-seed0-1" / "manifest.json")["status"] == "done"
    assert not (sweep / "values-seed0-0" / "manifest.json").exists()
