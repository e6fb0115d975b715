"""Must hold: a run killed with SIGKILL in the middle of critique and in the middle of training,
then re-run with the same command, ends with the datasets and checkpoint of an uninterrupted run.

Before that, a SIGTERM during sampling checks the graceful path: exit status 143 and the line
that says how to resume, whose command the rest of the test then uses.
Drives the real `selftrain` console script on the tiny random model (greedy decoding). "The
middle of critique" is detected by polling for the stage's first committed chunk, "the middle
of training" by the train stage being recorded running and the trainer having logged a loss.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import load_from_disk
from safetensors.torch import load_file

from conftest import GREEDY_ARGS, compose
from selftrain.run.records import read_json, sha256_tree

SELFTRAIN = Path(sys.executable).parent / "selftrain"
ARGS = GREEDY_ARGS + [
    # several optimiser steps, so that a kill can land between them
    "train.sft.per_device_train_batch_size=1", "train.sft.num_train_epochs=4",
]
WAIT_S = 600  # generous: the point is the order of events, not their speed


def _start(argv, log: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent)


def _kill_when(proc, log: Path, ready, sig=signal.SIGKILL) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
        assert time.monotonic() - t0 < WAIT_S, f"no kill point after {WAIT_S} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=WAIT_S)


def _stage(run: Path, k: int, name: str) -> str | None:
    try:
        return read_json(run / f"gen-{k:03d}" / "manifest.json")["stages"].get(name, {}).get("status")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_in_critique_and_in_training_then_resume(tiny_model, tmp_path):
    from selftrain.run.loop import run as run_loop

    args = ARGS + [f"model.name_or_path={tiny_model}"]
    base = tmp_path / "uninterrupted"
    run_loop(compose(args), base)

    run = tmp_path / "killed"
    argv = [str(SELFTRAIN), *args, f"hydra.run.dir={run}"]
    g0 = run / "gen-000"

    # 0. SIGTERM once sampling has committed its first chunk: the chunk in flight is finished, the
    #    stage and the run are marked interrupted, and the exit status is 143 with one line that
    #    gives the command which resumes
    proc = _start(argv, tmp_path / "0.log")
    _kill_when(proc, tmp_path / "0.log", lambda: (g0 / ".chunks" / "sample" / "00000.jsonl").exists(),
               signal.SIGTERM)
    out = (tmp_path / "0.log").read_text()
    assert proc.returncode == 143, out[-3000:]
    lines = [line for line in out.splitlines() if "to resume, run: " in line]
    assert len(lines) == 1 and lines[0].startswith("selftrain: interrupted (SIGTERM"), out[-3000:]
    assert _stage(run, 0, "sample") == "interrupted" and read_json(run / "manifest.json")["status"] == "interrupted"
    assert 1 <= len(list((g0 / ".chunks" / "sample").glob("0*.jsonl"))) < 4
    resume = shlex.split(lines[0].split("to resume, run: ", 1)[1])
    assert resume[1:] == argv[1:-1] + [f"hydra.run.dir={run.resolve()}"]
    argv = [str(SELFTRAIN), *resume[1:]]  # from now on: the command that line gave

    # 1. SIGKILL once the critique stage has committed its first chunk
    proc = _start(argv, tmp_path / "a.log")
    _kill_when(proc, tmp_path / "a.log", lambda: (g0 / ".chunks" / "critique" / "00000.jsonl").exists())
    committed = len(list((g0 / ".chunks" / "critique").glob("0*.jsonl")))
    assert _stage(run, 0, "critique") == "running" and 1 <= committed < 4, committed
    assert not (g0 / "critiques.jsonl").exists()

    # 2. the same command: critique resumes from its chunks; SIGKILL once training has logged a loss
    proc = _start(argv, tmp_path / "b.log")
    _kill_when(proc, tmp_path / "b.log",
               lambda: _stage(run, 0, "train") == "running" and "'loss'" in (tmp_path / "b.log").read_text())
    crit = read_json(g0 / "manifest.json")["stages"]["critique"]
    assert crit["status"] == "done" and crit["counts"]["chunks_resumed"] >= committed
    assert _stage(run, 0, "train") == "running"
    assert not (run / "gen-001" / "model").exists()  # nothing half-written is in place

    # 3. the same command again finishes the run
    p = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=WAIT_S,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_json(run / "manifest.json")["status"] == "done"

    # each prompt exactly once, and the same bytes as the uninterrupted run
    samples = [json.loads(line)["prompt_id"] for line in open(g0 / "samples.jsonl")]
    critiques = [json.loads(line)["prompt_id"] for line in open(g0 / "critiques.jsonl")]
    assert len(samples) == 8 and critiques == samples and len(set(samples)) == 8
    for name in ("sft", "preference"):
        ids = load_from_disk(str(g0 / "data" / name))["prompt_id"]
        assert len(ids) == len(set(ids)) and set(ids) <= set(samples)
    for rel in ("samples.jsonl", "critiques.jsonl"):
        assert (g0 / rel).read_bytes() == (base / "gen-000" / rel).read_bytes(), rel
    assert _files(g0 / "data") == _files(base / "gen-000" / "data")

    # the checkpoint is whole: it loads, matches its recorded hash and the uninterrupted run's
    model = run / "gen-001" / "model"
    assert load_file(str(model / "model.safetensors"))
    recorded = read_json(g0 / "manifest.json")["stages"]["train"]["outputs"]["gen-001/model"]
    assert recorded == sha256_tree(model) == sha256_tree(base / "gen-001" / "model")
    assert not [p for p in run.rglob("*.tmp")] and not (g0 / ".chunks").exists()
