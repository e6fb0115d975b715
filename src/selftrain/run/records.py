"""The one record schema: manifests, atomic writes and hashes for everything a run writes.

Where each file of a run folder lives is selftrain.run.layout's to say.
A finished stage's manifest entry holds "outputs": {path relative to the run folder: sha256_tree}.
Reports and comparisons read these files, never live objects.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

SCHEMA_VERSION = 1


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: config keys as a user types them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(configs: list[dict]) -> tuple[list[str], list[str]]:
    """Where nested configs differ, by flattened key (`flatten`): the keys every config has but
    with differing values, then the keys only some have (a missing key reads as None), each
    sorted. Values compare by repr, so 1 and 1.0 differ."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    differing = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    everywhere = [k for k in differing if all(k in f for f in flat)]
    return everywhere, [k for k in differing if any(k not in f for f in flat)]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a temporary name, then a rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        _sync(f)
    os.replace(tmp, path)


def _sync(f) -> None:
    """Flush a file to disk before it is renamed into place, so a crash of the machine (not
    only of the process) cannot leave a renamed but empty file."""
    f.flush()
    os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        _sync(f)
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict:
    """A run or generation manifest; a damaged one is a UserError naming the file."""
    from selftrain import UserError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a valid manifest (not JSON: {e}); "
                        "restore it or start a new run folder") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a valid manifest (expected a JSON object)")
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UserError(f"{path}: schema_version={version!r} is not one this selftrain reads "
                        f"(up to {SCHEMA_VERSION}); use the selftrain that wrote it")
    if not isinstance(data.get("stages", {}), dict):
        raise UserError(f"{path}: not a valid manifest ('stages' is not an object)")
    return data


def check_disk(folder: Path, need: int, what: str) -> None:
    """Refuse to write `what` (about `need` bytes) into `folder` when the disk has less free."""
    from selftrain import UserError

    p = Path(folder).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < need:
        raise UserError(f"not enough disk space for {what}: {need} bytes needed ({need / 1e9:.2f} GB), "
                        f"{free} bytes free ({free / 1e9:.2f} GB) on {p}")


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_user_jsonl(file: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a user's JSONL file. Undecodable text,
    invalid JSON and non-objects raise a UserError naming the file and line."""
    from selftrain import UserError

    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = Path(file).read_bytes()[:e.start].count(b"\n") + 1
        raise UserError(f"{file}: line {line}: not UTF-8 text ({e.reason})") from e
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{file}: line {lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise UserError(f"{file}: line {lineno}: expected a JSON object")
        yield lineno, row


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        _sync(f)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash a file, or a folder's files (names and contents, sorted, hidden files skipped)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("selftrain", "torch", "transformers", "trl", "datasets", "peft",
                 "accelerate", "hydra-core", "sentence-transformers", "vllm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class Manifest:
    """A manifest.json held in memory and rewritten atomically after every change."""

    def __init__(self, path: Path, initial: dict | None = None, root: Path | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent  # outputs are named relative to it
        if self.path.exists():
            self.data = read_manifest(self.path)
        else:
            self.data = {"schema_version": SCHEMA_VERSION, "created": now(), **(initial or {})}
            self.data.setdefault("stages", {})
            self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def stage_done(self, name: str) -> bool:
        return self.data.get("stages", {}).get(name, {}).get("status") == "done"

    @contextlib.contextmanager
    def stage(self, name: str, outputs: Iterable[Path] = (), optional: Iterable[Path] = ()) -> Iterator[dict]:
        """Time a stage; the yielded dict collects its counts. On success the sha256 of every
        path in `outputs` is recorded under "outputs" ({path relative to root: sha256_tree}),
        and only then is the stage marked done. `optional` paths are recorded if they exist."""
        stages = self.data.setdefault("stages", {})
        entry = {"status": "running", "started": now()}
        stages[name] = entry
        self.save()
        counts: dict = {}
        t0 = time.perf_counter()
        try:
            yield counts
        except BaseException as e:
            entry.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                         error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            self.save()
            raise
        hashes = {}
        outputs = list(outputs) + [p for p in optional if Path(p).exists()]
        for p in outputs:
            if not Path(p).exists():
                raise RuntimeError(f"stage {name} finished without writing {p}")
            hashes[Path(p).relative_to(self.root).as_posix()] = sha256_tree(p)
        entry.update(status="done", finished=now(), seconds=round(time.perf_counter() - t0, 3),
                     counts=counts, outputs=hashes)
        self.save()
