"""Shared pieces of the benchmarks: timing, the model under test, prompts and token counts."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Sizes:
    """How much work each section does; `quick` only checks that the runner works."""
    prompts: int            # sampling: prompts per arm
    single_prompts: int     # sampling: prompts for the one-at-a-time arm (tokens/s is per arm)
    max_new_tokens: int     # sampling: budget of an initial response
    batch_size: int         # sampler batch size (the pipeline's default)
    critique_prompts: int
    critique_tokens: int
    revision_tokens: int
    fewshot: int
    sft_rows: int
    sft_batch: int
    sft_max_length: int
    copy_mb: int            # memory-bandwidth copy test: tensor size
    matmul_n: int           # fp32 matmul test: n x n
    batch_sweep: tuple      # sampling ablation: batch sizes tried
    static_cache: bool      # sampling ablation: bare generate with transformers' static cache
    repeats: int            # interleaved repeats of each A/B arm; the median is reported


# 256 prompts: two batches at the default batch size of 128. The static-cache arm is off: it ran
# slower than the pipeline (benchmarks/RESULTS.md) and takes the longest of all arms;
# --static-cache puts it back.
FULL = Sizes(prompts=256, single_prompts=8, max_new_tokens=96, batch_size=128, critique_prompts=16,
             critique_tokens=48, revision_tokens=112, fewshot=1, sft_rows=32, sft_batch=8, sft_max_length=512,
             copy_mb=512, matmul_n=2048, batch_sweep=(64,), static_cache=False, repeats=1)
QUICK = Sizes(prompts=4, single_prompts=2, max_new_tokens=8, batch_size=4, critique_prompts=4,
              critique_tokens=8, revision_tokens=8, fewshot=1, sft_rows=8, sft_batch=4, sft_max_length=256,
              copy_mb=32, matmul_n=512, batch_sweep=(2, 4), static_cache=True, repeats=1)


@contextmanager
def timer(out: dict, key: str = "seconds"):
    t0 = time.perf_counter()
    yield
    out[key] = round(time.perf_counter() - t0, 3)


def median(xs):
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def rate(tokens, seconds):
    return round(tokens / seconds, 2) if seconds else None


def load(model_path: str):
    from selftrain import models

    path = models.resolve(model_path)
    model, tok = models.load_model(path, "float32"), models.load_tokenizer(path)
    model.eval()
    return path, model, tok


def prompts(n: int, seed: int = 0):
    """n shipped training prompts, red-team and helpful mixed as in the experiments (3:1)."""
    from omegaconf import OmegaConf

    from selftrain.prompts import load_prompts

    cfg = OmegaConf.create({"sources": [
        {"name": "red_team", "path": "builtin:prompts/red_team.jsonl", "n": max(1, n - n // 4),
         "hf": None, "hf_name": None, "split": "train", "field": "prompt"},
        {"name": "helpful", "path": "builtin:prompts/helpful.jsonl", "n": max(1, n // 4),
         "hf": None, "hf_name": None, "split": "train", "field": "prompt"}]})
    return load_prompts(cfg, seed)[:n]


def new_token_count(rows: torch.Tensor, eos_ids: set[int]) -> int:
    """Generated tokens up to and including each row's first end-of-sequence token."""
    n = 0
    for row in rows.tolist():
        stop = next((j for j, t in enumerate(row) if t in eos_ids), None)
        n += len(row) if stop is None else stop + 1
    return n


def eos_set(tok) -> set[int]:
    e = tok.eos_token_id
    return set(e if isinstance(e, list) else [e])


def weight_bytes(model) -> int:
    """Bytes streamed per decoding step: every parameter once (tied embeddings counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())

EMBEDDED = "embedded:smollm2-135m-instruct"


def interleave(arms: dict, repeats: int, required: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Run every arm once per repeat, A/B/A/B, so slow drift in the machine's load hits every arm
    alike. An arm that raises is reported in `errors` and dropped, unless it is `required`.
    Returns ({arm: [results]}, {arm: error line})."""
    runs: dict[str, list] = {k: [] for k in arms}
    errors: dict[str, str] = {}
    for _ in range(repeats):
        for name, fn in arms.items():
            if name in errors:
                continue
            try:
                runs[name].append(fn())
            except Exception as e:  # an ablation this install cannot do is reported, not fatal
                if name in required:
                    raise
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return runs, errors
