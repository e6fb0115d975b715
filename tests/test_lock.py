"""One owner per run folder (selftrain.run.lock): two real processes on one folder, stale locks taken
over and recorded, a lock file that is not ours, a lost lock, and read-only commands that never
take the lock. Whole runs use the tiny random model with greedy decoding (a few seconds each)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GREEDY_ARGS, compose, finished_run
from selftrain import UserError
from selftrain.run import lock as lockmod
from selftrain.run.lock import LOCK_FILE, FolderLocked, RunLock
from selftrain.run.records import read_json

SELFTRAIN = Path(sys.executable).parent / "selftrain"
ARGS = GREEDY_ARGS
WAIT_S = 300


# Files that record the run's own path or timings, so differ between any two runs
TIMED = ("manifest.json", "index.html", "train_log.json", "report.md", "report.json", "report.html")


def artifacts(run: Path) -> dict[str, bytes]:
    """Every file a run leaves but those in TIMED and Hydra's log, and the output hashes each
    stage recorded for them: what an uninterrupted run must match byte for byte."""
    out = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
           if p.is_file() and p.name not in TIMED and p.suffix != ".log"}
    for m in sorted(run.glob("gen-*/manifest.json")):
        for stage, entry in read_json(m)["stages"].items():
            for rel, digest in entry.get("outputs", {}).items():
                if not rel.endswith(("/drift", "train_log.json")):
                    out[f"{stage}: {rel}"] = digest.encode()
    return out


@pytest.fixture(scope="module")
def args(tiny_model):
    return ARGS + [f"model.name_or_path={tiny_model}"]


@pytest.fixture(scope="module")
def finished(args, tmp_path_factory) -> Path:
    return finished_run(args, tmp_path_factory)


def _lock_file(run: Path, **fields) -> Path:
    holder = {"host": socket.gethostname(), "boot_id": lockmod._boot_id(), "pid": os.getpid(),
              "started": "2026-01-01T00:00:00+00:00", "token": "t" * 32, **fields}
    (run / LOCK_FILE).write_text(json.dumps(holder) + "\n")
    return run / LOCK_FILE


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_two_processes_one_folder(args, finished, tmp_path):
    """Both start at once on one folder: the one that holds the lock is paused until the other has
    given up (so the race cannot end before the second looks); the other exits 2 with one line
    naming the holder; the folder ends as one uninterrupted run leaves it."""
    run = tmp_path / "run"
    argv = [str(SELFTRAIN), *args, f"hydra.run.dir={run}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [subprocess.Popen(argv, stdout=open(lg, "w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
             for lg in logs]
    try:
        t0 = time.monotonic()
        while True:
            try:
                pid = json.loads((run / LOCK_FILE).read_text())["pid"]
                break
            except (FileNotFoundError, json.JSONDecodeError):
                assert all(p.poll() is None for p in procs), [lg.read_text()[-2000:] for lg in logs]
                assert time.monotonic() - t0 < WAIT_S
                time.sleep(0.01)
        winner = next(i for i, p in enumerate(procs) if p.pid == pid)
        loser = procs[1 - winner]
        os.kill(pid, signal.SIGSTOP)
        try:
            loser.wait(timeout=WAIT_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        procs[winner].wait(timeout=WAIT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = logs[1 - winner].read_text()
    assert loser.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith(f"selftrain: error: {run}: in use by another selftrain "
                                                     f"process, pid {pid} on {socket.gethostname()}"), out[-3000:]
    assert f"'ps -fp {pid}'" in errors[0]
    assert procs[winner].returncode == 0, logs[winner].read_text()[-3000:]
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "done" and len(manifest["attempts"]) == 1 and "lock_takeovers" not in manifest
    assert not (run / LOCK_FILE).exists()
    assert artifacts(run) == artifacts(finished)


RACER = """
import sys, time
from pathlib import Path
from selftrain.run.lock import FolderLocked, RunLock
folder, go, stop = map(Path, sys.argv[1:])
while not go.exists():
    time.sleep(0.001)
try:
    lock = RunLock(folder).acquire()
except FolderLocked:
    print("refused")
    sys.exit(0)
print("won")
sys.stdout.flush()
while not stop.exists():
    time.sleep(0.01)
lock.release()
"""


def test_many_processes_race_for_one_folder(tmp_path):
    """Eight processes released at once onto one folder: exactly one holds it, the rest are refused."""
    go, stop = tmp_path / "go", tmp_path / "stop"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "run"), str(go), str(stop)],
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    time.sleep(1.0)  # started and waiting (a late one is refused all the same: the winner holds on)
    go.touch()
    try:
        t0 = time.monotonic()
        while sum(p.poll() is not None for p in procs) < 7:
            assert time.monotonic() - t0 < 60
            time.sleep(0.05)
    finally:
        stop.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["refused"] * 7 + ["won"], outs
    assert not (tmp_path / "run" / LOCK_FILE).exists() and not list((tmp_path / "run").iterdir())


def test_stale_lock_of_a_dead_process_is_taken_over_and_recorded(args, finished, tmp_path):
    from selftrain.run.loop import run

    d = tmp_path / "run"
    shutil.copytree(finished, d)
    pid = _dead_pid()
    _lock_file(d, pid=pid)
    manifest = run(compose(args), d)
    assert manifest["status"] == "done" and manifest["attempts"][-1]["mode"] == "resume"
    (takeover,) = read_json(d / "manifest.json")["lock_takeovers"]
    assert takeover["from"]["pid"] == pid and takeover["reason"] == f"pid {pid} on this machine is gone"
    assert not (d / LOCK_FILE).exists()


def test_live_holder_refused_and_a_reused_pid_is_not_a_holder(tmp_path):
    with RunLock(tmp_path) as held:
        with pytest.raises(FolderLocked, match=rf"in use by another selftrain process, pid {os.getpid()} on "):
            RunLock(tmp_path).acquire()  # the same pid, alive, and its flock is held
        assert (tmp_path / LOCK_FILE).exists() and held.took_over is None
    assert not (tmp_path / LOCK_FILE).exists()
    # a live pid that holds no flock on the file: the pid was reused by another process
    path = _lock_file(tmp_path, pid=os.getppid())
    os.utime(path, (time.time() - 10, time.time() - 10))  # not one being created right now
    with RunLock(tmp_path) as lock:
        assert lock.took_over["reason"] == f"pid {os.getppid()} on this machine no longer holds the lock"


def test_other_host_holds_until_its_heartbeat_is_stale(tmp_path):
    path = _lock_file(tmp_path, host="node-elsewhere", pid=4242)
    with pytest.raises(FolderLocked) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "\n" not in msg and "pid 4242 on node-elsewhere" in msg and "'ps -fp 4242' on node-elsewhere" in msg
    old = time.time() - lockmod.STALE_S - 60
    os.utime(path, (old, old))
    with RunLock(tmp_path) as lock:
        assert lock.took_over["from"]["host"] == "node-elsewhere"
        assert lock.took_over["reason"].startswith("no heartbeat for ")
        assert read_json(path)["token"] == lock.record["token"]


def test_requeued_slurm_job_takes_over_its_earlier_run(tmp_path, monkeypatch):
    """Slurm runs a requeued job only after its earlier run ended, on whatever node: no wait."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _lock_file(tmp_path, host="node-elsewhere", pid=4242, slurm_job={"id": "77", "rank": 0, "restart": 0})
    with RunLock(tmp_path) as lock:
        assert "earlier run (restart 0) of this Slurm job 77" in lock.took_over["reason"]
    # the same run of the job (another command in one allocation) is not taken over
    _lock_file(tmp_path, host="node-elsewhere", pid=4242, slurm_job={"id": "77", "rank": 0, "restart": 1})
    with pytest.raises(FolderLocked, match=r"\(Slurm job 77\)"):
        RunLock(tmp_path).acquire()


def test_malformed_lock_file_is_one_line_and_left_alone(args, finished, tmp_path):
    from selftrain.run.loop import run

    d = tmp_path / "run"
    shutil.copytree(finished, d)
    path = d / LOCK_FILE
    for text in ("not json at all\n", '{"host": "h"}\n', ""):
        path.write_text(text)
        old = time.time() - 60
        os.utime(path, (old, old))
        with pytest.raises(UserError) as e:
            run(compose(args), d)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{path}: not a selftrain lock file (")
        assert "if no selftrain process is running in" in msg and "delete the file and run again" in msg
        assert path.read_text() == text  # left for the user to judge


def test_lost_lock_stops_the_holder_and_a_deleted_one_is_taken_again(tmp_path):
    lost = []
    lock = RunLock(tmp_path, on_lost=lambda lk, holder: lost.append(holder)).acquire()
    try:
        (tmp_path / LOCK_FILE).unlink()  # deleted by hand while the run goes on
        lock.heartbeat()
        assert not lost and read_json(tmp_path / LOCK_FILE)["token"] == lock.record["token"]
        _lock_file(tmp_path, host="node-elsewhere", pid=4242)  # another process took the folder over
        lock.heartbeat()
        assert len(lost) == 1 and lost[0]["host"] == "node-elsewhere"
    finally:
        lock.release()
    assert read_json(tmp_path / LOCK_FILE)["host"] == "node-elsewhere"  # release leaves another's lock alone


def test_read_only_commands_never_take_the_lock(finished, tmp_path, monkeypatch, capsys):
    from selftrain.cli import compare_main, lineage_main

    sweep = tmp_path / "sweep"
    runs = [sweep / "values-seed0-0", sweep / "rules-seed0-1"]  # the run as it is, and a copy as another arm
    for d in runs:
        shutil.copytree(finished, d)
    m = read_json(runs[1] / "manifest.json")
    m["constitution"]["name"] = m["config"]["constitution"]["name"] = "rules"
    (runs[1] / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(lockmod, "HEARTBEAT_S", 3600)  # so that only a reader could change the files
    locks = [RunLock(d).acquire() for d in runs]  # both folders held by a live process (this one)
    try:
        before = {d: ((d / LOCK_FILE).read_bytes(), (d / LOCK_FILE).stat().st_mtime_ns) for d in runs}

        def refuse(self):
            raise AssertionError(f"{self.run_dir}: a read-only command took the lock")
        monkeypatch.setattr(RunLock, "acquire", refuse)
        t0 = time.monotonic()
        assert lineage_main([str(runs[0])]) == 0
        assert compare_main([str(sweep), "--out", str(tmp_path / "cmp")]) == 0, capsys.readouterr().err
        assert time.monotonic() - t0 < 60  # neither waited for the holder
        assert {d: ((d / LOCK_FILE).read_bytes(), (d / LOCK_FILE).stat().st_mtime_ns) for d in runs} == before
    finally:
        for lk in locks:
            lk.release()
