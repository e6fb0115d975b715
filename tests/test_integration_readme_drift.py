"""The README's `selftrain-drift` examples, run as written on the embedded model (each probes the
full default suite on a reference and a candidate: minutes on 2 CPU cores)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from selftrain.models import embedded_checkpoint

pytestmark = pytest.mark.integration
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _readme_drift_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("selftrain-drift ")]


def test_readme_drift_examples_run_as_written(tmp_path):
    """Each `selftrain-drift` line of the README, run from a folder where its paths exist: the
    run folder it names holds a real checkpoint (the embedded model itself) and ../shared is this
    checkout's shared folder, when it has one."""
    cmds = _readme_drift_commands()
    assert cmds, "the README has no selftrain-drift example"
    base = embedded_checkpoint()
    for i, cmd in enumerate(cmds):
        work = tmp_path / f"ex{i}"
        work.mkdir()
        for path in re.findall(r"runs/[^,\]\s]+/model", cmd):
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            (work / path).symlink_to(base)
        if "../shared/" in cmd:
            shared = ROOT.parent / "shared"
            if not (shared / "external").is_dir():
                pytest.skip("../shared/external is not beside this checkout")
            (tmp_path / "shared").symlink_to(shared)
        exe = Path(sys.executable).parent / cmd.split()[0]
        proc = subprocess.run([str(exe), *cmd.split()[1:]], cwd=work, capture_output=True, text=True, env=ENV,
                              timeout=1800)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
        assert "alert(s)" in proc.stdout
