"""Runs that survive a cluster: a submitit job pre-empted the way Slurm does it (SIGTERM, then
submitit's SIGUSR2) is requeued and resumes, ending as an uninterrupted run; and re-running a
sweep reports each job (done, resumed from a stage, running elsewhere, failed). Tiny random
model, greedy decoding; the sweeps run the real `selftrain` console script."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selftrain.run.lock import LOCK_FILE, RunLock
from selftrain.run.records import read_json, write_json
from test_lock import args, artifacts, finished  # noqa: F401 (fixtures shared with the lock tests)

SELFTRAIN = Path(sys.executable).parent / "selftrain"
WAIT_S = 600


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.mark.slow
def test_preempted_submitit_job_is_requeued_and_resumes(args, finished, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    sweep = tmp_path / "sweep"
    job = sweep / "values-seed0-0"
    argv = [str(SELFTRAIN), "-m", "hydra/launcher=submitit_local", *args,
            f"hydra.sweep.dir={sweep}"]
    log = tmp_path / "sweep.log"
    proc = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    try:
        # once critique has committed a chunk, pre-empt the job's process (the lock names it)
        t0 = time.monotonic()
        while not (job / "gen-000" / ".chunks" / "critique" / "00000.jsonl").exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - t0 < WAIT_S, log.read_text()[-3000:]
            time.sleep(0.02)
        pid = json.loads((job / LOCK_FILE).read_text())["pid"]
        assert pid != proc.pid  # the job runs in submitit's process, not in the sweep's
        os.kill(pid, signal.SIGTERM)  # Slurm's pre-emption notice ...
        os.kill(pid, signal.SIGUSR2)  # ... and submitit's signal, which Slurm sends with it
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]

    manifest = read_json(job / "manifest.json")
    assert manifest["status"] == "done"
    first, second = manifest["attempts"]
    assert first["pid"] == pid and first["mode"] == "new"
    assert second["pid"] != pid and second["mode"] == "resume" and second["from"] == "gen-000/critique"
    crit = read_json(job / "gen-000" / "manifest.json")["stages"]["critique"]
    assert crit["status"] == "done" and crit["counts"]["chunks_resumed"] >= 1
    # submitit requeued it (the local executor restarts a job that exits 144)
    job_logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert (" received at gen-000/critique); finished stages and committed chunks are kept; handing the job to "
            "submitit to requeue") in job_logs, job_logs[-3000:]  # the chunk in flight was finished
    assert "this job is preempted" in job_logs and "Requeued job" in job_logs, job_logs[-3000:]
    assert f"selftrain:   job 0 in {job}: resumed from gen-000/critique: done" in out, out[-3000:]
    assert not (job / LOCK_FILE).exists()
    assert artifacts(job) == artifacts(finished)


@pytest.mark.slow
def test_sweep_report_done_resumed_locked_failed(args, finished, tmp_path):
    """Four jobs of one config (resume=true is not part of the config a resume compares), each
    folder prepared in another state; the re-run sweep reports each and exits 1 for the failure."""
    sweep = tmp_path / "sweep"
    jobs = [sweep / f"values-seed0-{n}" for n in range(4)]
    for d in jobs:
        shutil.copytree(finished, d)
    # job 1: stopped before gen-001's report
    g1 = read_json(jobs[1] / "gen-001" / "manifest.json")
    del g1["stages"]["report"]
    g1.pop("status", None)
    write_json(jobs[1] / "gen-001" / "manifest.json", g1)
    write_json(jobs[1] / "manifest.json", {**read_json(jobs[1] / "manifest.json"), "status": "interrupted"})
    # job 3: an output changed since its stage finished
    with open(jobs[3] / "gen-000" / "samples.jsonl", "a") as f:
        f.write('{"prompt_id": "extra"}\n')
    argv = [str(SELFTRAIN), "-m", *args, "resume=true,true,true,true", f"hydra.sweep.dir={sweep}"]
    with RunLock(jobs[2]) as held:  # job 2 runs elsewhere: this process holds its folder
        p = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=WAIT_S)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.splitlines()
    at = lines.index("selftrain: sweep of 4 job(s): 1 done, 1 resumed, 1 running elsewhere, 1 failed")
    report = lines[at + 1:]
    assert report[0] == f"selftrain:   job 0 in {jobs[0]}: done (nothing left to do)"
    assert report[1] == f"selftrain:   job 1 in {jobs[1]}: resumed from gen-001/report: done"
    assert report[2].startswith(f"selftrain:   job 2 in {jobs[2]}: running elsewhere (locked by "
                                f"pid {os.getpid()} on {held.record['host']}, since ")
    assert report[2].endswith(f"check it with 'ps -fp {os.getpid()}' on {held.record['host']})")
    assert report[3].startswith(f"selftrain:   job 3 in {jobs[3]}: failed: {jobs[3]}/gen-000/"
                                "samples.jsonl: changed since gen-000/sample wrote it")
    assert len(report) == 4
    assert read_json(jobs[1] / "manifest.json")["status"] == "done"
    assert read_json(jobs[2] / "manifest.json") == read_json(finished / "manifest.json")  # untouched


def test_preemption_notice_is_one_signal_and_a_late_sigterm_stops_at_once(monkeypatch):
    """In a submitit job SIGUSR2 and SIGTERM together (either order) are one pre-emption notice:
    the run stops at the next safe point and asks for a requeue. A SIGTERM long after SIGUSR2 is
    the time limit: it stops at once, still asking for the requeue."""
    from selftrain.run import interrupts
    from selftrain.run.interrupts import Interrupted, check_interrupt, graceful_interrupts

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for first, second in ((signal.SIGUSR2, signal.SIGTERM), (signal.SIGTERM, signal.SIGUSR2)):
        with graceful_interrupts():
            os.kill(os.getpid(), first)
            os.kill(os.getpid(), second)
            time.sleep(0.05)
            with pytest.raises(Interrupted) as e:
                check_interrupt()
            assert e.value.requeue and not e.value.immediate
    monkeypatch.setattr(interrupts, "PAIR_S", 0.0)
    with graceful_interrupts():
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        assert e.value.immediate and e.value.requeue
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    before = signal.getsignal(signal.SIGUSR2)
    with graceful_interrupts():  # outside a submitit job SIGUSR2 is left alone
        assert signal.getsignal(signal.SIGUSR2) is before


def test_a_job_submitit_will_not_requeue_fails_with_its_reason():
    utils = pytest.importorskip("submitit.core.utils")
    from selftrain.run.preempt import requeue

    def handler(signum, frame):  # submitit's, once the job has timed out max_num_timeout times
        raise utils.UncompletedJobError("Job not requeued because: timed-out too many times.")

    old = signal.signal(signal.SIGUSR2, handler)
    try:
        assert requeue(signal.SIGUSR2) == "Job not requeued because: timed-out too many times"
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert requeue(signal.SIGUSR2) == "this process has no submitit handler for it"
