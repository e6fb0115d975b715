"""sampler=vllm where vllm is not installed: one line telling how to install it, exit 2.

Kept out of test_bad_inputs' corpus because it holds only where vllm is absent (CI).
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SELFTRAIN = Path(sys.executable).parent / "selftrain"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_without_vllm_is_one_line(tmp_path):
    proc = subprocess.run([str(SELFTRAIN), "sampler=vllm", "model.name_or_path=./tripwire-no-such-model/model",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["selftrain: error: sampler=vllm needs vllm: pip install 'selftrain[vllm]'"], proc.stderr
