"""Critique and revision: tokens/s of the critique stage with and without the shared-prefix KV
cache. Every request in a round starts with the same chat-template system prompt and few-shot
transcripts; with the cache their keys and values are computed once per call."""
from __future__ import annotations

import time

from selftrain.constitution import Constitution
from selftrain.stages.critique import critique_revise
from selftrain.engines.base import SamplingParams
from selftrain.engines.hf import HFSampler
from selftrain.stages.sample import sample_stage

from .common import median, rate, ratio


def run(model, tok, prompts, sizes, constitution: str = "builtin:constitution/values.md") -> dict:
    con = Constitution.load(constitution)
    p0 = SamplingParams(max_new_tokens=sizes.max_new_tokens, temperature=0.7, top_p=0.95,
                        repetition_penalty=1.1, seed=0)
    samples = sample_stage(HFSampler(model, tok, batch_size=sizes.batch_size), prompts, p0)
    pc = SamplingParams(**{**p0.__dict__, "max_new_tokens": sizes.critique_tokens, "seed": 1})
    pr = SamplingParams(**{**p0.__dict__, "max_new_tokens": sizes.revision_tokens, "seed": 2})
    arms: dict[str, list] = {"prefix_cache": [], "no_prefix_cache": []}
    for _ in range(sizes.repeats):
        for name in arms:
            s = HFSampler(model, tok, batch_size=sizes.batch_size, prefix_cache=(name == "prefix_cache"))
            t0 = time.perf_counter()
            recs = critique_revise(s, con, samples, 1, sizes.fewshot, pc, pr, seed=0)
            secs = time.perf_counter() - t0
            st = s.take_stats()
            arms[name].append({"seconds": secs, **st, "revisions": [r["final"] for r in recs]})
    res = {}
    for name, runs in arms.items():
        res[name] = {"tokens_per_s": median([rate(r["new_tokens"], r["seconds"]) for r in runs]),
                     "seconds": median([round(r["seconds"], 3) for r in runs]),
                     "new_tokens": median([r["new_tokens"] for r in runs]),
                     "prompt_tokens": runs[0]["prompt_tokens"],
                     "prefix_tokens_reused": runs[0]["prefix_tokens_reused"], "runs": len(runs)}
    on, off = res["prefix_cache"], res["no_prefix_cache"]
    same = sum(a == b for a, b in zip(arms["prefix_cache"][0]["revisions"], arms["no_prefix_cache"][0]["revisions"]))
    return {"settings": {"prompts": len(samples), "fewshot": sizes.fewshot, "rounds": 1,
                         "critique_max_new_tokens": sizes.critique_tokens,
                         "revision_max_new_tokens": sizes.revision_tokens, "batch_size": sizes.batch_size,
                         "constitution": constitution, "repeats": sizes.repeats},
            "arms": res,
            "speedup_from_prefix_cache": ratio(on["tokens_per_s"], off["tokens_per_s"]),
            "seconds_saved_fraction": round(1 - on["seconds"] / off["seconds"], 3) if off["seconds"] else None,
            "prompt_tokens_not_recomputed_fraction": round(on["prefix_tokens_reused"] / on["prompt_tokens"], 3)
            if on["prompt_tokens"] else None,
            "identical_revisions": f"{same}/{len(samples)}"}
