"""selftrain-lineage: the chain of generations, and tampering found on disk."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).parent / "selftrain-lineage")


@pytest.fixture(scope="module")
def tiny_run(tiny_run_1gen):
    return tiny_run_1gen


def _lineage(run_dir, *extra):
    return subprocess.run([EXE, str(run_dir), *extra], capture_output=True, text=True, timeout=300)


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_clean_run_verifies(tiny_run):
    p = _lineage(tiny_run)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "gen-000" in out and "gen-001" in out and "0 mismatch(es)" in out
    assert "constitution" in out and "probe suite" in out
    data = json.loads(_lineage(tiny_run, "--json").stdout)
    assert data["mismatches"] == [] and data["checked"] >= 5


def test_tampered_dataset_is_found(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path / "run")
    arrow = sorted((run_dir / "gen-000" / "data" / "sft").glob("*.arrow"))[0]
    with open(arrow, "ab") as f:
        f.write(b"\0")
    p = _lineage(run_dir)
    assert p.returncode == 1
    bad = [line for line in p.stdout.splitlines() if line.startswith("MISMATCH")]
    assert len(bad) == 1 and "gen-000/data/sft" in bad[0], p.stdout


def test_tampered_model_is_found(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path / "run")
    with open(run_dir / "gen-001" / "model" / "model.safetensors", "ab") as f:
        f.write(b"\0")
    p = _lineage(run_dir)
    assert p.returncode == 1
    assert any(line.startswith("MISMATCH") and "gen-001" in line for line in p.stdout.splitlines()), p.stdout


def test_not_a_run_folder(tmp_path):
    p = _lineage(tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "selftrain-lineage: error:" in p.stderr
    (tmp_path / "manifest.json").write_text("{not json")
    p = _lineage(tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "manifest.json" in p.stderr
