"""The embedded model's one-off conversion is safe when parallel jobs start on a fresh machine."""
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.integration

CODE = "from selftrain.models import embedded_checkpoint; print(embedded_checkpoint())"


def test_parallel_first_use_converts_once(tmp_path):
    env = {**os.environ, "SELFTRAIN_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CODE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    folder = paths.pop()
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 100
    leftovers = [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
