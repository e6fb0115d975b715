"""Sampling: the pipeline's sample stage against a bare batched `generate` loop and against
one prompt at a time, same prompts and settings; plus ablations of the sampler's settings
(sampler.prefix_cache, sampler.prefill_rows, the batch size).

Arms run interleaved (A B C A B C ...) when repeats > 1, and each reports its median.
"""
from __future__ import annotations

import time

import torch

from selftrain.engines.base import SamplingParams
from selftrain.engines.hf import HFSampler
from selftrain.stages.sample import sample_stage

from . import hardware
from .common import eos_set, interleave, median, new_token_count, rate, ratio


def params(sizes) -> SamplingParams:
    # the pipeline's sampler defaults (conf/sampler/hf.yaml)
    return SamplingParams(max_new_tokens=sizes.max_new_tokens, temperature=0.7, top_p=0.95,
                          repetition_penalty=1.1, seed=0)


def pipeline_arm(model, tok, prompts, p, batch_size, **settings) -> dict:
    """The sample stage with an HFSampler; `settings`: other `sampler.*` values than the defaults."""
    sampler = HFSampler(model, tok, batch_size=batch_size, **settings)
    t0 = time.perf_counter()
    sample_stage(sampler, prompts, p)
    s = time.perf_counter() - t0
    st = sampler.take_stats()
    return {"seconds": s, "new_tokens": st["new_tokens"], "batches": st["batches"]}


@torch.inference_mode()
def bare_arm(model, tok, prompts, p, batch_size, **gen_kw) -> dict:
    """What a user would write: chat template, tokenizer padding, model.generate, in the given order."""
    texts = [tok.apply_chat_template([{"role": "user", "content": q.text}], tokenize=False,
                                     add_generation_prompt=True) for q in prompts]
    eos, tokens, batches = eos_set(tok), 0, 0
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, len(texts), batch_size)):
        enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(model.device)
        torch.manual_seed(p.seed * 1_000_003 + b)
        gen = model.generate(**enc, max_new_tokens=p.max_new_tokens, do_sample=True, temperature=p.temperature,
                             top_p=p.top_p, top_k=None, repetition_penalty=p.repetition_penalty,
                             pad_token_id=tok.pad_token_id, **gen_kw)
        tokens += new_token_count(gen[:, enc["input_ids"].shape[1]:], eos)
        batches += 1
    return {"seconds": time.perf_counter() - t0, "new_tokens": tokens, "batches": batches}


def bracketed(arm, matmul_n: int) -> dict:
    """The arm's result with the fp32 matmul throughput measured just before and just after it.
    A shared machine's speed drifts over minutes (benchmarks/RESULTS.md), so a roofline measured
    in another section can be off by as much; the better of the two bracketing measurements
    gives the roofline the arm is judged against (the higher, so the stricter)."""
    before = hardware.matmul_flops(matmul_n)["gflop_per_s"]
    r = arm()
    after = hardware.matmul_flops(matmul_n)["gflop_per_s"]
    return {**r, "matmul_gflop_per_s_around": max(before, after)}


def _summ(runs: list[dict]) -> dict:
    rates = [rate(r["new_tokens"], r["seconds"]) for r in runs]
    out = {"tokens_per_s": median(rates), "seconds": median([round(r["seconds"], 3) for r in runs]),
           "new_tokens": median([r["new_tokens"] for r in runs]), "batches": runs[0]["batches"],
           "runs": len(runs)}
    if "matmul_gflop_per_s_around" in runs[0]:  # the roofline around the arm: median, like tokens/s
        out["matmul_gflop_per_s_around"] = median([r["matmul_gflop_per_s_around"] for r in runs])
    return out


def run(model, tok, prompts, sizes, ablations: bool = True) -> dict:
    p = params(sizes)
    B = sizes.batch_size
    arms = {
        "pipeline": lambda: bracketed(lambda: pipeline_arm(model, tok, prompts, p, B), sizes.matmul_n),
        "bare_batched_generate": lambda: bare_arm(model, tok, prompts, p, B),
        "one_at_a_time": lambda: bare_arm(model, tok, prompts[:sizes.single_prompts], p, 1),
    }
    if ablations:
        # the two choices users set (sampler.prefix_cache, sampler.prefill_rows); the engine's other
        # fast paths have no switch, and each is compared with the plain path in tests/
        arms["pipeline_no_prefix_cache"] = lambda: pipeline_arm(model, tok, prompts, p, B, prefix_cache=False)
        # generate prefills and decodes each padded batch itself
        arms["pipeline_whole_batch_prefill"] = lambda: pipeline_arm(model, tok, prompts, p, B, prefill_rows=None)
        if sizes.static_cache:
            arms["bare_static_cache"] = lambda: bare_arm(model, tok, prompts, p, B, cache_implementation="static")
        for bs in sizes.batch_sweep:
            if bs != B:
                arms[f"pipeline_batch_{bs}"] = lambda bs=bs: pipeline_arm(model, tok, prompts, p, bs)
    # warm-up (one-time allocations, lazy imports), so the first arm timed does not pay for it
    pipeline_arm(model, tok, prompts[:2], SamplingParams(**{**p.__dict__, "max_new_tokens": 2}), B)
    bare_arm(model, tok, prompts[:2], SamplingParams(**{**p.__dict__, "max_new_tokens": 2}), B)
    runs, errors = interleave(arms, sizes.repeats, required=("pipeline", "bare_batched_generate", "one_at_a_time"))
    res = {k: _summ(v) for k, v in runs.items() if v}
    for k, e in errors.items():
        res[k] = {"error": e}
    pipe = res["pipeline"]["tokens_per_s"]
    out = {"settings": {"prompts": len(prompts), "one_at_a_time_prompts": sizes.single_prompts, "batch_size": B,
                        "max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
                        "repetition_penalty": p.repetition_penalty, "repeats": sizes.repeats},
           "arms": res,
           "pipeline_vs_bare_batched": ratio(pipe, res["bare_batched_generate"]["tokens_per_s"]),
           "pipeline_vs_one_at_a_time": ratio(pipe, res["one_at_a_time"]["tokens_per_s"])}
    for k, v in res.items():
        if k.startswith(("pipeline_", "bare_static")) and "tokens_per_s" in v:
            v["vs_pipeline"] = ratio(v["tokens_per_s"], pipe)
    return out
