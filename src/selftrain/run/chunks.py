"""Committed chunks: the sample and critique stages work through their prompts in fixed chunks.

Each finished chunk of `sampler.chunk_size` prompts is committed as gen-k/.chunks/<stage>/<i>.jsonl
(written to a temporary name, then renamed), so a kill at any instant loses at most the chunk in
flight. Chunk boundaries and seeds depend only on the prompt list, the chunk size and the run
seed, never on where an earlier attempt stopped: a resumed stage writes the same records as an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Sequence

from selftrain import UserError
from selftrain.run import seeds
from selftrain.run.interrupts import check_interrupt
from selftrain.run.records import write_jsonl

CHUNK_FILE = re.compile(r"^(\d{5})\.jsonl$")


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
        m = CHUNK_FILE.match(p.name)
        if m is None:
            continue  # a temporary file a kill left behind; the chunk is redone
        i = int(m.group(1))
        if i >= len(id_parts):
            raise UserError(f"{p}: committed chunk {i} is beyond this stage's {len(id_parts)} chunks; "
                            "delete it to go on")
        read_chunk(p, list(id_parts[i]))
