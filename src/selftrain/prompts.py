"""Training prompt sets: shipped JSONL files, the user's own, or a Hugging Face dataset.

Shipped: prompts/red_team.jsonl (requests a careful assistant declines or redirects) and
prompts/helpful.jsonl (ordinary requests, some edgy-sounding, so the loop also learns not to
over-refuse). Each source draws `n` prompts with the run's seed.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass

from selftrain import UserError
from selftrain.paths import resolve
from selftrain.run.records import read_user_jsonl, sha256_bytes

MAX_PROMPT_CHARS = 8000


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    source: str
    category: str = ""


def read_jsonl_prompts(path: str, source: str, field: str = "prompt") -> list[Prompt]:
    file = resolve(path, "prompt file")
    if not file.is_file():
        raise UserError(f"{file}: not a file")
    out, seen = [], set()
    for lineno, row in read_user_jsonl(file):
        text = row.get(field)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{file}: line {lineno}: key '{field}' must be a non-empty string")
        if len(text) > MAX_PROMPT_CHARS:
            raise UserError(f"{file}: line {lineno}: prompt longer than {MAX_PROMPT_CHARS} characters")
        pid = str(row.get("id", f"{source}-{lineno:05d}"))
        if pid in seen:
            raise UserError(f"{file}: line {lineno}: duplicate id '{pid}'")
        seen.add(pid)
        out.append(Prompt(pid, text.strip(), source, str(row.get("category", ""))))
    return out


def read_hf_prompts(src) -> list[Prompt]:
    import datasets

    try:
        ds = datasets.load_dataset(src.hf, src.hf_name, split=src.split)
    except Exception as e:  # the hub, the cache and dataset scripts raise many types
        raise UserError(f"cannot load dataset {src.hf} (split {src.split}): {str(e).splitlines()[0]}") from e
    if src.field not in ds.column_names:
        raise UserError(f"dataset {src.hf} has no field '{src.field}' (fields: {', '.join(ds.column_names)})")
    return [Prompt(f"{src.name}-{i:06d}", str(t).strip(), src.name)
            for i, t in enumerate(ds[src.field]) if t and str(t).strip()]


def load_prompts(cfg_prompts, seed: int) -> list[Prompt]:
    """Draw each source's prompts with the seed; refuse an empty set and duplicate ids."""
    out: list[Prompt] = []
    for i, src in enumerate(cfg_prompts.sources):
        rows = read_hf_prompts(src) if src.hf else read_jsonl_prompts(src.path, src.name, src.field)
        if not rows:
            raise UserError(f"prompt set is empty: prompts.sources[{i}] ({src.path or src.hf}) holds no prompts")
        if src.n is not None and src.n < len(rows):
            rows = random.Random(f"{seed}:prompts:{src.name}").sample(rows, src.n)
        out.extend(rows)
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise UserError(f"prompt id '{dup}' appears in more than one source; ids must be unique")
    return out


def prompts_hash(prompts: list[Prompt]) -> str:
    return sha256_bytes(json.dumps([asdict(p) for p in prompts], sort_keys=True).encode())
