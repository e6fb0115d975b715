"""The sample stage: model k's initial response to each prompt, committed in resumable chunks."""
from __future__ import annotations

from pathlib import Path

from selftrain.engines.base import Sampler, SamplingParams
from selftrain.run import seeds
from selftrain.run.chunks import chunk_params, run_chunks
from selftrain.run.layout import GenDir
from selftrain.run.records import write_jsonl
from selftrain.stages import sampling


def run_sample(gen: GenDir, cfg, sampler: Sampler, prompts) -> dict:
    """The sample stage: model k's answers to the run's prompts -> gen-k/samples.jsonl, chunks
    committed in gen-k/.chunks/sample as they finish."""
    counts: dict = {}
    recs = sample_stage(sampler, prompts, sampling(cfg, cfg.sampler.max_new_tokens, seeds.sample(cfg.seed, gen.k)),
                        gen.chunk_dir("sample"), cfg.sampler.chunk_size, counts)
    write_jsonl(gen.samples, recs)
    counts.update(prompts=len(recs), sampler=sampler.describe(), **sampler.take_stats())
    return counts


def sample_stage(sampler: Sampler, prompts, params: SamplingParams, chunk_dir: Path | None = None,
                 chunk_size: int = 64, counts: dict | None = None) -> list[dict]:
    """Model k's initial responses: one record per prompt.

    With `chunk_dir`, the prompts go in fixed chunks of `chunk_size`, each committed there as it
    finishes (selftrain.run.chunks); chunk i samples with a seed made from params.seed and i alone,
    so a resumed stage writes the same records as an uninterrupted one."""
    def work(i: int, part) -> list[dict]:
        convs = [[{"role": "user", "content": p.text}] for p in part]
        p_chunk = chunk_params(params, i) if chunk_dir is not None else params
        responses = sampler.chat(convs, p_chunk, desc="sample")
        return [{"prompt_id": p.id, "source": p.source, "category": p.category, "prompt": p.text,
                 "response": r} for p, r in zip(part, responses)]

    if chunk_dir is None:
        return work(0, prompts)
    return run_chunks(chunk_dir, prompts, [p.id for p in prompts], chunk_size, work,
                      counts if counts is not None else {})
