"""Critique and revision: N rounds per prompt against principles drawn from the constitution.

Each round draws one principle (rules) or one section (values document) with an RNG seeded
by (seed, prompt id, round), so a draw never depends on batch order, and records which. The
model sees the few-shot transcripts, then the prompt and its current answer, then the
critique request; then its critique and the revision request. A round revises the previous
round's revision, as in Constitutional AI. The critique stage commits its records in fixed
chunks of prompts, all rounds of a chunk together (selftrain.run.resume), so a kill loses at most
one chunk and a resumed stage writes the same records as an uninterrupted one.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from selftrain.constitution import Constitution
from selftrain.engines.base import Sampler, SamplingParams
from selftrain.run import seeds
from selftrain.run.layout import GenDir
from selftrain.run.records import read_jsonl, write_jsonl
from selftrain.run.chunks import chunk_params, run_chunks
from selftrain.stages import sampling

# Small models often echo a label before the text ("Revision: ..."); strip it.
_LABEL = re.compile(r"^\s*\**\s*(?:revised response|revision|rewritten response|critique)\s*\**\s*:\s*\**\s*",
                    re.IGNORECASE)


def clean(text: str) -> str:
    return _LABEL.sub("", text).strip()


def draw_principle(constitution: Constitution, seed: int, prompt_id: str, round_: int):
    return constitution.draw(random.Random(f"{seed}:principle:{prompt_id}:{round_}"))


def critique_revise(sampler: Sampler, constitution: Constitution, samples: list[dict], rounds: int,
                    fewshot: int, critique_params: SamplingParams,
                    revision_params: SamplingParams, seed: int) -> list[dict]:
    context = [m for ex in constitution.exemplars[:fewshot] for m in ex.messages()]
    records = [{**s, "rounds": [], "final": s["response"]} for s in samples]
    for r in range(rounds):
        drawn = [draw_principle(constitution, seed, rec["prompt_id"], r) for rec in records]
        base = [context + [{"role": "user", "content": rec["prompt"]},
                           {"role": "assistant", "content": rec["final"]}] for rec in records]
        crit_convs = [b + [{"role": "user", "content": p.critique}] for b, p in zip(base, drawn)]
        p_crit = SamplingParams(**{**critique_params.__dict__, "seed": seeds.revision_round(critique_params.seed, r)})
        critiques = [clean(c) for c in sampler.chat(crit_convs, p_crit, desc=f"critique r{r + 1}")]
        rev_convs = [c + [{"role": "assistant", "content": crit}, {"role": "user", "content": p.revision}]
                     for c, crit, p in zip(crit_convs, critiques, drawn)]
        p_rev = SamplingParams(**{**revision_params.__dict__, "seed": seeds.revision_round(revision_params.seed, r)})
        revisions = [clean(v) for v in sampler.chat(rev_convs, p_rev, desc=f"revision r{r + 1}")]
        for rec, p, crit, rev in zip(records, drawn, critiques, revisions):
            rec["rounds"].append({"round": r, "principle": p.id, "critique_request": p.critique,
                                  "critique": crit, "revision_request": p.revision, "revision": rev})
            rec["final"] = rev
    return records


def critique_stage(sampler: Sampler, constitution: Constitution, samples: list[dict], rounds: int,
                   fewshot: int, critique_params: SamplingParams, revision_params: SamplingParams,
                   seed: int, chunk_dir: Path, chunk_size: int, counts: dict) -> list[dict]:
    """critique_revise over fixed chunks of `samples`, each committed in `chunk_dir` as it
    finishes; chunk i's sampling seeds come from the stage seeds and i alone."""
    def work(i: int, part) -> list[dict]:
        return critique_revise(sampler, constitution, list(part), rounds, fewshot,
                               chunk_params(critique_params, i), chunk_params(revision_params, i), seed)

    return run_chunks(chunk_dir, samples, [s["prompt_id"] for s in samples], chunk_size, work, counts)


def outputs(gen: GenDir, cfg) -> list[Path]:
    return [gen.critiques]


def run_critique(gen: GenDir, cfg, sampler: Sampler, constitution: Constitution) -> dict:
    """The critique stage: gen-k/samples.jsonl -> gen-k/critiques.jsonl, chunks committed in
    gen-k/.chunks/critique as they finish."""
    counts: dict = {}
    recs = critique_stage(
        sampler, constitution, read_jsonl(gen.samples), cfg.critique.rounds, cfg.constitution.fewshot,
        sampling(cfg, cfg.critique.critique_max_new_tokens, seeds.critique(cfg.seed, gen.k)),
        sampling(cfg, cfg.critique.revision_max_new_tokens, seeds.revision(cfg.seed, gen.k)),
        seed=seeds.draw(cfg.seed, gen.k), chunk_dir=gen.chunk_dir("critique"), chunk_size=cfg.sampler.chunk_size,
        counts=counts)
    write_jsonl(gen.critiques, recs)
    usage: dict[str, int] = {}
    for r in recs:
        for rd in r["rounds"]:
            usage[rd["principle"]] = usage.get(rd["principle"], 0) + 1
    counts.update(records=len(recs), rounds=cfg.critique.rounds, principle_usage=usage,
                  sampler=sampler.describe(), **sampler.take_stats())
    return counts
