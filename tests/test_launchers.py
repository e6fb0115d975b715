"""Hydra launchers shipped in conf/hydra/launcher/: a 2-job sweep through submitit's local
executor (the same job machinery as the Slurm launcher) on the tiny model, one generation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES

SELFTRAIN = Path(sys.executable).parent / "selftrain"
MINI = Path(__file__).resolve().parent / "data" / "mini_suite"
LIGHT = ["generations=1", f"probes.suite={MINI}", "monitor.embedding=false", "monitor.activations=false",
         "monitor.cue_gap=false"]


@pytest.mark.slow  # two whole runs, each in its own submitit process
def test_submitit_local_sweep(tiny_model, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    sweep = tmp_path / "sweep"
    proc = subprocess.run([str(SELFTRAIN), "-m", "hydra/launcher=submitit_local", *TINY_OVERRIDES, *LIGHT,
                           f"model.name_or_path={tiny_model}", "seed=0,1", f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/manifest.json"))
    assert [p.name for p in runs] == ["values-seed0-0", "values-seed1-1"]
    for run, seed in zip(runs, (0, 1)):
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["config"]["seed"] == seed
        assert (run / "gen-001" / "model" / "model.safetensors").is_file()
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # the jobs went through submitit
