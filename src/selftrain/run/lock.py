"""One owner per run folder: the lock file <run>/.selftrain.lock.

The first process to open a run folder puts the lock file in place atomically (O_CREAT|O_EXCL,
then a hard link: see RunLock._create) with who holds it: host, boot id, pid, start time, a
random token and, under Slurm, the job id, rank and restart count. It keeps the file for as long
as it runs and removes it when it ends. Its heartbeat is the file's modification time, touched by a thread every
HEARTBEAT_S seconds: a rename-free touch, so the file never changes inode (which would drop the
flock below) and a reader never sees it half-written; on NFS the server sets the time.

The holder also keeps an fcntl.flock on the file where the filesystem supports it. The kernel
drops that lock the moment the process dies, even under SIGKILL, so on the same machine it tells
a live holder from a dead one whose pid was reused.

A second process is refused with a FolderLocked error, unless the lock is stale:
- held on this machine (same host name and boot id) by a process that is gone;
- held by an earlier run of the same Slurm job (same job id and rank, a lower restart count):
  Slurm starts a requeued job only after the previous run of it has ended, whatever node it ran on;
- held elsewhere with no heartbeat for STALE_S seconds (a shared filesystem, another node).
A stale lock is taken over; `took_over` says from whom and why, for the run manifest.

The holder checks at every heartbeat that the file is still its own. If another process took the
folder over (this one was suspended past STALE_S, say), it stops at once, writing nothing more,
so that a folder never has two writers. Read-only commands (selftrain-lineage, selftrain-compare)
never look at the lock.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from selftrain import UserError
from selftrain.run.records import now

try:
    import fcntl
except ImportError:  # not on Windows: the O_EXCL file alone, and the pid check
    fcntl = None

log = logging.getLogger(__name__)

LOCK_FILE = ".selftrain.lock"  # hidden: output hashes, start_over and force_stage skip dot files
HEARTBEAT_S = 20
# On a shared filesystem the heartbeat is compared with this machine's clock: the margin covers
# attribute caching (NFS caches mtimes up to a minute) and clock skew between nodes.
STALE_S = 300
# Where a lock file is created in place (no hard links), it may look empty or unlocked this long
_WRITE_GRACE_S = 2.0
LOST_EXIT = 75  # EX_TEMPFAIL: stopped because another process took the folder over


class FolderLocked(UserError):
    """The run folder is held by a live process; `holder` is what its lock file records."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _slurm_job() -> dict | None:
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {"id": os.environ["SLURM_JOB_ID"], "rank": int(os.environ.get("SLURM_PROCID", 0)),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _flock_free(path: Path) -> bool | None:
    """Whether nobody holds a flock on `path`; None where flock is unsupported."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP: a filesystem without flock
        return None
    finally:
        os.close(fd)  # also drops the flock if we got it
    return True


def describe(holder: dict) -> str:
    """'pid 123 on node7 (Slurm job 45), since <time>' for messages."""
    job = holder.get("slurm_job")
    return (f"pid {holder.get('pid')} on {holder.get('host')}"
            + (f" (Slurm job {job['id']})" if isinstance(job, dict) and "id" in job else "")
            + f", since {holder.get('started')}")


class RunLock:
    """Hold `run_dir` for the life of a `with` block (or acquire() ... release())."""

    def __init__(self, run_dir: Path, on_lost=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.took_over: dict | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_lost = on_lost or _exit_lost
        self.record = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(), "started": now(),
                       "token": uuid.uuid4().hex}
        job = _slurm_job()
        if job:
            self.record["slurm_job"] = job

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ acquire

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a race with another process taking over the same stale lock
            if self._create():
                self._start_heartbeat()
                return self
            holder = self._read()
            if holder is None:  # it ended between our create and our read
                continue
            why = self._stale(holder)
            if why is None:
                raise FolderLocked(
                    f"{self.run_dir}: in use by another selftrain process, {describe(holder)}, heartbeat "
                    f"{self._age():.0f} s ago (lock file {self.path}); check it with 'ps -fp {holder['pid']}' on "
                    f"{holder['host']}, and run this again once it has ended (the folder resumes then)", holder)
            if self._remove_stale(holder):
                self.took_over = {"at": now(), "reason": why,
                                  "from": {k: holder.get(k) for k in ("host", "pid", "started", "slurm_job")
                                           if k in holder}}
                log.warning("%s: took over the lock of %s: %s", self.run_dir, describe(holder), why)
        raise FolderLocked(f"{self.run_dir}: another process keeps taking this folder's lock ({self.path}); "
                           "check what runs in it", {})

    def _create(self) -> bool:
        """Put our lock file in place, already written and flocked; False if one is there.
        It is written under a name of its own (created O_CREAT|O_EXCL) and hard-linked into place:
        link() is atomic and fails if the name exists, on local disks and NFS alike, so no other
        process ever sees the lock file empty or not yet flocked. Where hard links are not
        supported, the lock file itself is created O_CREAT|O_EXCL (readers allow for the moment
        before it is written)."""
        data = (json.dumps(self.record) + "\n").encode()
        own = self.path.with_name(f"{LOCK_FILE}.new-{self.record['token']}")
        try:
            fd = _open_locked(own, data)
            try:
                os.link(own, self.path)
            except FileExistsError:
                os.close(fd)
                return False
            except OSError:  # no hard links on this filesystem
                os.close(fd)
                try:
                    fd = _open_locked(self.path, data)
                except FileExistsError:
                    return False
            finally:
                own.unlink(missing_ok=True)
        except OSError as e:
            raise UserError(f"{self.path}: cannot create the run folder's lock file ({e.strerror})") from e
        self._fd = fd
        return True

    def _read(self) -> dict | None:
        """The holder the lock file records; None if the file is gone. A file that is not a
        selftrain lock (after the short window in which a new one is being written) is a UserError."""
        while True:
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            except UnicodeDecodeError:
                text = "\0"
            except OSError as e:
                raise UserError(f"{self.path}: cannot read the run folder's lock file ({e.strerror})") from e
            holder, why = _parse(text)
            if holder is not None:
                return holder
            if self._age() > _WRITE_GRACE_S:
                raise UserError(
                    f"{self.path}: not a selftrain lock file ({why}); if no selftrain process is running in "
                    f"{self.run_dir} (check 'ps -ef | grep selftrain' on every machine that shares it), delete "
                    "the file and run again")
            time.sleep(0.1)

    def _age(self) -> float:
        """Seconds since the lock file's last heartbeat (infinite once it is gone)."""
        try:
            return max(0.0, time.time() - self.path.stat().st_mtime)
        except FileNotFoundError:
            return float("inf")

    def _stale(self, holder: dict) -> str | None:
        """Why `holder` no longer holds the folder, or None if it may still be running."""
        me = self.record
        if holder["host"] == me["host"] and holder.get("boot_id") == me["boot_id"]:
            if not _pid_alive(holder["pid"]):
                return f"pid {holder['pid']} on this machine is gone"
            if _flock_free(self.path):
                # the pid is alive but is another process now, unless the holder is between its
                # create and its flock (only where there are no hard links, see _create)
                while self._age() < _WRITE_GRACE_S:
                    time.sleep(0.1)
                if _flock_free(self.path):
                    return f"pid {holder['pid']} on this machine no longer holds the lock"
            return None
        job, mine = holder.get("slurm_job"), me.get("slurm_job")
        if (isinstance(job, dict) and mine and job.get("id") == mine["id"] and job.get("rank") == mine["rank"]
                and isinstance(job.get("restart"), int) and job["restart"] < mine["restart"]):
            return f"an earlier run (restart {job['restart']}) of this Slurm job {mine['id']}, which has ended"
        age = self._age()
        if age > STALE_S:
            return f"no heartbeat for {age:.0f} s (stale after {STALE_S} s)"
        return None

    def _remove_stale(self, holder: dict) -> bool:
        """Move the stale lock aside and delete it, if it is still the one we judged."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.record['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved, _ = _parse(aside.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            moved = None
        if moved is not None and moved.get("token") != holder.get("token"):
            # another process took the stale lock over between our read and our rename: give its lock back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------ hold and release

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="selftrain-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.heartbeat()
            except Exception:  # a dead heartbeat thread would let another node take the folder
                log.exception("%s: lock heartbeat failed; trying again in %s s", self.run_dir, HEARTBEAT_S)

    def heartbeat(self) -> None:
        """Touch the lock file if it is still ours; stop the process if another took it over."""
        try:
            holder, _ = _parse(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            holder = None
        except (OSError, UnicodeDecodeError):
            return  # a read error on a shared filesystem: try again at the next beat
        if holder is not None and holder.get("token") == self.record["token"]:
            try:
                os.utime(self.path)
            except OSError:
                pass  # gone or unreachable for a moment: the next beat looks again
            return
        if holder is None and self._create_again():
            return
        if not self._stop.is_set():
            self._on_lost(self, holder)

    def _create_again(self) -> bool:
        """Someone deleted our lock file while we run: take it again if nobody else has."""
        old = self._fd
        if self._create():
            if old is not None:
                os.close(old)
            return True
        return False

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        try:
            holder, _ = _parse(self.path.read_text(encoding="utf-8"))
            if holder is not None and holder.get("token") == self.record["token"]:
                self.path.unlink()
        except (OSError, UnicodeDecodeError):
            pass
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None


def _open_locked(path: Path, data: bytes) -> int:
    """Create `path` (O_CREAT|O_EXCL), flock it where the filesystem can, write `data`."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # no flock on this filesystem: the pid and heartbeat checks remain
    os.write(fd, data)
    os.fsync(fd)
    return fd


def _parse(text: str) -> tuple[dict | None, str]:
    """(holder, '') for a selftrain lock file's text, else (None, why not)."""
    if not text.strip():
        return None, "empty"
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    for key, kind in (("host", str), ("pid", int), ("started", str), ("token", str)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            return None, f"no {key}"
    return data, ""


def _exit_lost(lock: RunLock, holder: dict | None) -> None:
    """Another process holds the folder now: stop at once, so that it is its only writer."""
    sys.stderr.write(f"selftrain: error: {lock.run_dir}: this process lost the folder's lock to "
                     f"{describe(holder) if holder else 'another process'}; stopped without writing more\n")
    sys.stderr.flush()
    os._exit(LOST_EXIT)
