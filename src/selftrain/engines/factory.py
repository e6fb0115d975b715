"""Choosing and starting a sampling engine from the `sampler.*` settings.

`make_sampler` picks the engine named by `sampler.backend` (hf, openai or vllm); the sample
and critique stages only see the `Sampler` protocol of `selftrain.engines.base`, so the records
they write do not depend on the engine, and the stage manifest records `describe()`.
`sampling_throughput` times one `chat` call and counts the new tokens, for benchmarks.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

from selftrain import UserError
from selftrain.config.schema import SamplerConfig
from selftrain.engines.base import Conversation, SamplingParams
from selftrain.engines.hf import HFSampler
from selftrain.engines.openai import OpenAISampler
from selftrain.engines.vllm import VLLMSampler, check_vllm


def hf_sampler(scfg, model, tokenizer, batch_size: int | None = None) -> HFSampler:
    """An HFSampler with the `sampler.*` settings it reads (batch_size: sampler.batch_size unless
    given). Keys added after a config was written fall back to the schema's defaults."""
    def get(key):
        return scfg[key] if key in scfg else getattr(SamplerConfig, key)

    return HFSampler(model, tokenizer, batch_size=batch_size or scfg.batch_size, prefix_cache=scfg.prefix_cache,
                     max_batch_tokens=scfg.max_batch_tokens, memory_budget_gib=get("memory_budget_gib"),
                     prefill_rows=get("prefill_rows"))


def make_sampler(scfg, load_model_fn: Callable[[], tuple], model_path: str, model_cfg=None):
    """The sampler that `sampler.backend` names, for the model at `model_path`.

    `load_model_fn` returns (model, tokenizer) and is only called for hf, so the other
    engines never load the weights into this process.
    """
    if scfg.backend == "hf":
        return hf_sampler(scfg, *load_model_fn())
    if scfg.backend == "openai":
        return OpenAISampler(scfg.base_url, scfg.model or model_path, api_key_env=scfg.api_key_env,
                             max_concurrency=scfg.max_concurrency, timeout_s=scfg.timeout_s,
                             retries=scfg.retries, backoff_s=scfg.backoff_s,
                             repetition_penalty_as=scfg.repetition_penalty_as, check_model=scfg.check_model)
    if scfg.backend == "vllm":
        return VLLMSampler(model_path, tensor_parallel_size=scfg.tensor_parallel_size,
                           gpu_memory_utilization=scfg.gpu_memory_utilization,
                           enable_prefix_caching=scfg.enable_prefix_caching, max_model_len=scfg.max_model_len,
                           dtype=model_cfg.dtype if model_cfg is not None else "auto",
                           trust_remote_code=bool(model_cfg and model_cfg.trust_remote_code))
    raise UserError(f"sampler.backend={scfg.backend}: must be one of hf, openai, vllm")


def check_engine(scfg) -> None:
    """What the machine must offer the chosen engine: vllm installed, enough GPUs."""
    if scfg.backend == "vllm":
        check_vllm(scfg.tensor_parallel_size)


def preflight(scfg, base_model: str) -> None:
    """Fail at start, not after generation 0's probes: the server answers and serves
    generation 0's model."""
    check_engine(scfg)
    if scfg.backend == "openai":
        make_sampler(scfg, lambda: (None, None), base_model)


def make_labeller(pref, scfg, model_path: str) -> OpenAISampler:
    """A served AI-feedback labeller (preferences.labeller_base_url), with the openai sampler's
    connection settings; it must return log-probs, or the label stage stops in one line."""
    try:
        return OpenAISampler(pref.labeller_base_url, pref.labeller or model_path, api_key_env=scfg.api_key_env,
                             max_concurrency=scfg.max_concurrency, timeout_s=scfg.timeout_s, retries=scfg.retries,
                             backoff_s=scfg.backoff_s, repetition_penalty_as=scfg.repetition_penalty_as,
                             check_model=scfg.check_model)
    except UserError as e:
        raise UserError(f"preferences.labeller_base_url: {e}") from e


def close_sampler(sampler) -> None:
    if sampler is not None and hasattr(sampler, "close"):
        sampler.close()


def sampling_throughput(sampler, conversations: Sequence[Conversation], params: SamplingParams,
                        tokenizer=None) -> dict:
    """Time one `chat` call; count new tokens by re-tokenizing the replies.

    Re-tokenizing with one tokenizer (the sampler's own, or `tokenizer`) counts every
    engine's output the same way; replies are stripped and EOS is not counted, so this
    slightly undercounts against a server's `usage`, which is reported alongside when the
    engine keeps it.
    """
    tok = tokenizer or getattr(sampler, "tokenizer", None)
    before = getattr(sampler, "completion_tokens", None)
    t0 = time.perf_counter()
    texts = sampler.chat(conversations, params, desc="throughput")
    seconds = time.perf_counter() - t0
    counted = ([len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts] if tok is not None else None)
    out = {"engine": sampler.describe(), "conversations": len(texts), "seconds": round(seconds, 4),
           "max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "seed": params.seed}
    if counted is not None:
        out.update(new_tokens=sum(counted), tokens_per_s=round(sum(counted) / seconds, 3) if seconds else math.inf)
    if before is not None:
        reported = sampler.completion_tokens - before
        out.update(reported_new_tokens=reported,
                   reported_tokens_per_s=round(reported / seconds, 3) if seconds else math.inf)
    return out
