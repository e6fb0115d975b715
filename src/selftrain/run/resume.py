"""Resuming a run folder: committed chunks, graceful interrupts, forced stages, read-back checks.

- The sample and critique stages work through their prompts in fixed chunks of
  `sampler.chunk_size`; each finished chunk is committed as gen-k/.chunks/<stage>/<i>.jsonl
  (written to a temporary name, then renamed), so a kill at any instant loses at most the chunk
  in flight. Chunk boundaries and seeds depend only on the prompt list, the chunk size and the
  run seed, never on where an earlier attempt stopped: a resumed stage writes the same records
  as an uninterrupted one.
- SIGINT/SIGTERM set a flag that is read between chunks, training steps and stages; the
  stage is then marked `interrupted` and the CLI exits 130/143 with the command that resumes.
  A second signal stops at once. In a submitit job, its pre-emption signal (SIGUSR2) stops the
  same way and asks for a requeue once the run has stopped (selftrain.run.preempt); with a SIGTERM
  a few seconds either side of it, it is one notice, since Slurm sends both on pre-emption.
- `force_stage` and `resume=false` move earlier outputs aside into <run>/replaced-<time>/
  (nothing is deleted); outputs of finished stages are checked against their recorded hashes
  before a resume uses them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

from selftrain import UserError
from selftrain.run.layout import GEN_PREFIX, MANIFEST, REPLACED_PREFIX, GenDir, RunDir, gen_name
from selftrain.run.records import read_manifest, sha256_tree, write_json, write_jsonl
from selftrain.run import seeds

log = logging.getLogger(__name__)

# A generation's stages in the order they run; the last generation runs only the first two.
STAGES = ("probe", "report", "sample", "critique", "data", "label", "screen", "guard", "train")
MONITOR_ONLY = ("probe", "report")
CHUNKED = ("sample", "critique")
_CHUNK_FILE = re.compile(r"^(\d{5})\.jsonl$")
_FORCE = re.compile(rf"^(?:{GEN_PREFIX}(\d{{3,}})/)?([a-z_]+)$")

# --------------------------------------------------------------------------- interrupts


class Interrupted(KeyboardInterrupt):
    """Raised at a safe point after SIGINT/SIGTERM (or at once after a second signal).
    `requeue`: submitit's pre-emption signal came too, so the job should be requeued."""

    def __init__(self, signum: int, immediate: bool = False, requeue: bool = False):
        self.signum, self.immediate, self.requeue = signum, immediate, requeue
        name = signal.Signals(signum).name
        super().__init__(f"{name} received" + (" twice: stopped at once" if immediate else ""))

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _Flag:
    signum: int | None = None
    requeue: bool = False
    stop: bool = False  # a SIGINT/SIGTERM came
    preempt_at: float | None = None  # when the pre-emption signal came (time.monotonic)


# Slurm sends SIGTERM and the pre-emption signal together, in either order, on pre-emption: one
# notice. A SIGTERM well after the pre-emption signal is the time limit itself: stop at once.
PAIR_S = 5.0


_FLAG = _Flag()


def check_interrupt() -> None:
    """Raise Interrupted if a signal arrived; called between chunks, training steps and stages."""
    if _FLAG.signum is not None:
        raise Interrupted(_FLAG.signum, requeue=_FLAG.requeue)


def interrupt_requested() -> bool:
    return _FLAG.signum is not None


@contextlib.contextmanager
def graceful_interrupts() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into a flag; a second one raises Interrupted at once.
    In a submitit job its pre-emption signal sets the flag too, and asks for a requeue."""
    from selftrain.run.preempt import preempt_signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    preempt = preempt_signal()
    sigs = (signal.SIGINT, signal.SIGTERM) + ((preempt,) if preempt else ())
    old = {s: signal.getsignal(s) for s in sigs}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if signum == preempt:
            _FLAG.requeue, _FLAG.preempt_at = True, time.monotonic()
            if _FLAG.signum is None:
                _FLAG.signum = signum
            log.warning("%s received (pre-emption or time limit): finishing the current chunk or step, "
                        "then stopping to be requeued", name)
            return
        paired = _FLAG.preempt_at is not None and time.monotonic() - _FLAG.preempt_at < PAIR_S
        if _FLAG.stop or (_FLAG.signum is not None and not paired):
            raise Interrupted(signum, immediate=True, requeue=_FLAG.requeue)
        _FLAG.stop = True
        if _FLAG.signum is None:
            _FLAG.signum = signum
            log.warning("%s received: finishing the current chunk or step, then stopping "
                        "(send it again to stop at once)", name)

    def reset():
        _FLAG.signum, _FLAG.requeue, _FLAG.stop, _FLAG.preempt_at = None, False, False, None

    reset()
    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        reset()


# --------------------------------------------------------------------------- chunks


def chunk_params(params, i: int):
    """Chunk i's sampling parameters: its seed comes from the stage seed and i alone.
    (selftrain.run.seeds.chunk: a prime stride larger than any chunk count, so two (seed, chunk)
    pairs never collide)"""
    return dataclasses.replace(params, seed=seeds.chunk(params.seed, i))


def split(items: Sequence, size: int) -> list[Sequence]:
    return [items[s:s + size] for s in range(0, len(items), size)]


def read_chunk(path: Path, ids: list[str]) -> list[dict]:
    """A committed chunk, checked to hold exactly `ids` in order; a damaged one is a UserError."""
    def bad(why: str) -> UserError:
        return UserError(f"{path}: committed chunk is damaged ({why}); delete it to sample that chunk again")

    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not JSON Lines: {e}") from e
    got = [r.get("prompt_id") if isinstance(r, dict) else None for r in rows]
    if got != ids:
        raise bad(f"holds prompt ids {got[:3]}... where this chunk's prompts are {ids[:3]}...")
    return rows


def run_chunks(folder: Path, items: Sequence, ids: list[str], size: int,
               work: Callable[[int, Sequence], list[dict]], counts: dict) -> list[dict]:
    """Process `items` in fixed chunks of `size`: committed chunks are read back, the rest are
    computed by work(i, part) and committed one by one. Returns all records in order."""
    out: list[dict] = []
    parts, id_parts = split(items, size), split(ids, size)
    resumed = 0
    for i, (part, part_ids) in enumerate(zip(parts, id_parts)):
        path = Path(folder) / f"{i:05d}.jsonl"
        if path.exists():
            rows = read_chunk(path, list(part_ids))
            resumed += 1
        else:
            check_interrupt()
            rows = work(i, part)
            write_jsonl(path, rows)
        out.extend(rows)
    counts.update(chunks=len(parts), chunks_resumed=resumed)
    return out


def check_chunks(folder: Path, ids: list[str], size: int) -> None:
    """Read-only check of a stage's committed chunks before a resume touches anything."""
    if not Path(folder).is_dir():
        return
    id_parts = split(ids, size)
    for p in sorted(Path(folder).iterdir()):
        m = _CHUNK_FILE.match(p.name)
        if m is None:
            continue  # a temporary file a kill left behind; the chunk is redone
        i = int(m.group(1))
        if i >= len(id_parts):
            raise UserError(f"{p}: committed chunk {i} is beyond this stage's {len(id_parts)} chunks; "
                            "delete it to go on")
        read_chunk(p, list(id_parts[i]))


# --------------------------------------------------------------------------- run folders


def _gen_manifests(run_dir: Path) -> list[tuple[int, Path, dict]]:
    out = []
    for g in RunDir(run_dir).gens():
        if g.manifest.is_file():
            out.append((g.k, g.path, read_manifest(g.manifest)))
    return out


def parse_force(value: str | None, generations: int) -> tuple[int | None, str] | None:
    """`force_stage`: `<stage>` or `gen-<k>/<stage>`; checked against the stage names."""
    if value is None:
        return None
    m = _FORCE.match(str(value))
    if m is None or m.group(2) not in STAGES:
        raise UserError(f"force_stage={value}: must be one of {', '.join(STAGES)}, "
                        "optionally prefixed with gen-<k>/ (e.g. gen-001/train)")
    k = None if m.group(1) is None else int(m.group(1))
    stage = m.group(2)
    if k is not None:
        last = generations if stage in MONITOR_ONLY else generations - 1
        if k > last:
            raise UserError(f"force_stage={value}: generation {k} has no {stage} stage "
                            f"(generations={generations}: {stage} runs in {gen_name(0)}..{gen_name(last)})")
    return k, stage


def force_target(run_dir: Path, force: tuple[int | None, str] | None) -> tuple[int, str] | None:
    """The (generation, stage) a forced redo starts from: the named generation, or the first one
    whose manifest records that stage. None when that stage has not run yet (a resume runs it)."""
    if force is None:
        return None
    k, stage = force
    for gk, _, data in _gen_manifests(run_dir):
        if (k is None or gk == k) and stage in data.get("stages", {}):
            return gk, stage
    return None


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _move_aside(run_dir: Path, rel: str, dest: Path) -> None:
    src = Path(run_dir) / rel
    if not src.exists():
        return
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(target))


def apply_force(run_dir: Path, target: tuple[int, str]) -> Path:
    """Invalidate `target` and everything after it: its own and later stages of that generation
    and every later generation. Their outputs move to <run>/replaced-<time>/. Returns that folder."""
    run_dir = Path(run_dir)
    k, stage = target
    dest = RunDir(run_dir).replaced(stamp())
    redo = STAGES[STAGES.index(stage):]
    gen = GenDir(run_dir, k)
    data = read_manifest(gen.manifest)
    stages = data.get("stages", {})
    for name in redo:
        entry = stages.pop(name, None)
        for rel in (entry or {}).get("outputs", {}):
            _move_aside(run_dir, rel, dest)
        _move_aside(run_dir, gen.rel(gen.chunk_dir(name)), dest)
    for key in ("status", "wall_s", "monitor_s", "monitor_fraction", "gate"):
        data.pop(key, None)
    for later, path, _ in _gen_manifests(run_dir):
        if later > k:
            _move_aside(run_dir, path.name, dest)
    write_json(gen.manifest, data)
    run_manifest = run_dir / MANIFEST
    if run_manifest.is_file():
        top = read_manifest(run_manifest)
        for key in ("gate", "final_report", "finished"):
            top.pop(key, None)
        top["generations_done"] = min(top.get("generations_done", k), k)
        write_json(run_manifest, top)
    log.warning("force_stage: redoing %s/%s and everything after it; earlier outputs moved to %s",
                gen.name, stage, dest)
    return dest


def start_over(run_dir: Path) -> Path | None:
    """`resume=false`: move every earlier output of this folder into <run>/replaced-<time>/."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).exists():
        return None
    dest = RunDir(run_dir).replaced(stamp())
    for p in sorted(run_dir.iterdir()):
        if p.name.startswith((".", REPLACED_PREFIX)) or p.suffix == ".log":
            continue  # Hydra's own files and earlier replaced outputs stay
        _move_aside(run_dir, p.name, dest)
    log.warning("resume=false: earlier outputs of %s moved to %s", run_dir, dest)
    return dest


def verify_outputs(run_dir: Path, skip: tuple[int, str] | None = None) -> None:
    """Every finished stage's recorded outputs must exist with their recorded hashes (read-only).
    `skip` is a forced (generation, stage): it and everything after it will be redone anyway."""
    for k, g, data in _gen_manifests(run_dir):
        for name, entry in data.get("stages", {}).items():
            if skip is not None and (k > skip[0] or (k == skip[0] and name in STAGES
                                                     and STAGES.index(name) >= STAGES.index(skip[1]))):
                continue
            if entry.get("status") != "done":
                continue
            for rel, digest in entry.get("outputs", {}).items():
                p = Path(run_dir) / rel
                hint = f"restore it, or redo that stage with force_stage={g.name}/{name}"
                if not p.exists():
                    raise UserError(f"{p}: missing, but {g.name}/{name} is recorded done; {hint}")
                now = sha256_tree(p)
                if now != digest:
                    raise UserError(f"{p}: changed since {g.name}/{name} wrote it (sha256 {digest[:12]}..., "
                                    f"now {now[:12]}...); {hint}")


def resume_command(key: str, folder: Path, argv: Sequence[str]) -> str:
    """The command that resumes: argv without its force_stage/resume overrides (a resume must
    not redo or move aside again), with `key` (hydra.run.dir or hydra.sweep.dir) set to `folder`."""
    import shlex

    drop = ("force_stage=", "resume=", "hydra.run.dir=", "hydra.sweep.dir=")
    args = [a for a in argv[1:] if not a.lstrip("+~").startswith(drop)]
    prog = Path(argv[0]).name if argv else "selftrain"
    return " ".join(shlex.quote(a) for a in [prog, *args, f"{key}={folder}"])
