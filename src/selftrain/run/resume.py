"""Resuming a run folder: forced stages, starting over, and read-back checks.

Committed chunks live in selftrain.run.chunks and graceful interrupts in selftrain.run.interrupts.
- `force_stage` and `resume=false` move earlier outputs aside into <run>/replaced-<time>/
  (nothing is deleted); outputs of finished stages are checked against their recorded hashes
  before a resume uses them.
"""
from __future__ import annotations

import logging
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from selftrain import UserError
from selftrain.run.layout import GEN_PREFIX, MANIFEST, MONITOR_ONLY, REPLACED_PREFIX, STAGES, GenDir, RunDir, gen_name
from selftrain.run.records import read_manifest, sha256_tree, write_json

log = logging.getLogger(__name__)

_FORCE = re.compile(rf"^(?:{GEN_PREFIX}(\d{{3,}})/)?([a-z_]+)$")

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
