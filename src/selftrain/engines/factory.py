"""Sampling engines outside this process: any OpenAI-compatible server, and vLLM's offline engine.

`make_sampler` picks the engine named by `sampler.backend` (hf, openai or vllm); the sample
and critique stages only see the `Sampler` protocol of `selftrain.engines.hf`, so the records
they write do not depend on the engine, and the stage manifest records `describe()`.

- `OpenAISampler` talks HTTP (stdlib urllib, no client library) to `vllm serve`, SGLang, TGI,
  llama.cpp's server or `transformers serve`: one chat completion per conversation, at most
  `max_concurrency` in flight, retries with exponential backoff on 429, 5xx and connection
  errors, a per-request timeout, a per-conversation seed, results in input order.
- `VLLMSampler` runs `vllm.LLM` in-process (batched chat, tensor parallel, prefix caching for
  the long constitution prefix that every critique request shares). vllm is an optional extra,
  imported only here and only when chosen.

`sampling_throughput` times one `chat` call and counts the new tokens, for benchmarks.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from tqdm.auto import tqdm

from selftrain import UserError, __version__
from selftrain.engines.hf import Conversation, HFSampler, SamplingParams, cut_at_stop

# A request's seed: distinct per conversation, stable under any completion order. The
# multiplier matches HFSampler's per-batch seeds (a large prime keeps seeds of neighbouring
# runs apart).
SEED_STRIDE = 1_000_003
# OpenAI caps top_logprobs at 20; vLLM's default max_logprobs is 20 too.
MAX_TOP_LOGPROBS = 20
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
VLLM_INSTALL = "sampler=vllm needs vllm: pip install 'selftrain[vllm]'"


def _option_match(options: Sequence[str], top: list[dict], floor: float) -> list[float]:
    """Each option's first token among a position's top log-probs, by decoded text.

    A server gives decoded token strings, not ids, so an option's first token is the longest
    top-K token that the option starts with (leading spaces ignored). An option absent from
    the top K gets `floor`, the smallest top-K log-prob: an upper bound on its true value.
    """
    out = []
    for opt in options:
        best, best_len = None, 0
        for entry in top:
            tok = entry.get("token") or ""
            if tok.strip() and opt.lstrip().startswith(tok.lstrip()) and len(tok.strip()) > best_len:
                best, best_len = float(entry["logprob"]), len(tok.strip())
        out.append(best if best is not None else floor)
    return out


class OpenAISampler:
    """Chat completions from an OpenAI-compatible HTTP server."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 max_concurrency: int = 8, timeout_s: float = 300.0, retries: int = 3,
                 backoff_s: float = 1.0, repetition_penalty_as: str = "repetition_penalty",
                 top_logprobs: int = MAX_TOP_LOGPROBS, check_model: bool = True):
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.api_key_env = api_key_env
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.repetition_penalty_as, self.top_logprobs = repetition_penalty_as, min(top_logprobs, MAX_TOP_LOGPROBS)
        self.prompt_tokens = self.completion_tokens = 0  # as the server reports them (`usage`)
        self._lock = threading.Lock()
        listed = self._get("/models").get("data", [])
        self.server_models = {m.get("id"): m for m in listed if isinstance(m, dict)}
        if check_model and model not in self.server_models:
            shown = ", ".join(sorted(map(str, self.server_models))[:5]) or "none"
            raise UserError(f"sampler: the server at {self.base_url} does not serve model {model!r} "
                            f"(it lists: {shown})")
        self.server_version = self._server_version()

    # ------------------------------------------------------------------ HTTP
    def _request(self, path: str, body: dict | None = None, retries: int | None = None) -> dict:
        url = self.base_url + path
        headers = {"Content-Type": "application/json", "User-Agent": f"selftrain/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        tries = 1 + (self.retries if retries is None else retries)
        reason = ""
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode() or "{}")
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code not in _RETRY_STATUS:
                    raise UserError(f"sampler: {url} refused the request (HTTP {e.code}): {detail}") from None
                reason = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                    socket.timeout) as e:
                reason = str(getattr(e, "reason", e)) or type(e).__name__
            except json.JSONDecodeError:
                raise UserError(f"sampler: {url} did not answer with JSON; is sampler.base_url "
                                f"an OpenAI-compatible /v1 endpoint?") from None
        raise UserError(f"sampler.base_url={self.base_url}: server unreachable after {tries} attempt(s) "
                        f"({reason})")

    def _get(self, path: str) -> dict:
        return self._request(path)

    def _server_version(self) -> str | None:
        """vLLM and SGLang answer GET /version; other servers may not (then None)."""
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        try:
            with urllib.request.urlopen(root + "/version", timeout=min(self.timeout_s, 5)) as resp:
                return str(json.loads(resp.read().decode()).get("version"))
        except Exception:  # noqa: BLE001 - the version is informative only
            return None

    def describe(self) -> dict:
        entry = self.server_models.get(self.model) or {}
        return {"engine": "openai-compatible", "base_url": self.base_url, "model": self.model,
                "owned_by": entry.get("owned_by"), "server_version": self.server_version,
                "client": f"selftrain/{__version__} urllib", "max_concurrency": self.max_concurrency,
                "timeout_s": self.timeout_s, "retries": self.retries,
                "repetition_penalty_as": self.repetition_penalty_as,
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}}

    # ------------------------------------------------------------------ requests
    def _body(self, conversation: Conversation, params: SamplingParams, seed: int) -> dict:
        greedy = params.temperature <= 0
        body = {"model": self.model, "messages": list(conversation), "max_tokens": params.max_new_tokens,
                "temperature": 0.0 if greedy else params.temperature, "seed": seed}
        if not greedy:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = list(params.stop)
        if params.repetition_penalty != 1.0:
            if self.repetition_penalty_as == "repetition_penalty":  # vLLM, SGLang: an extra field
                body["repetition_penalty"] = params.repetition_penalty
            elif self.repetition_penalty_as == "frequency_penalty":  # transformers serve: 1 + frequency_penalty
                body["frequency_penalty"] = params.repetition_penalty - 1.0
        return body

    def _map(self, fn: Callable[[int], object], n: int, desc: str) -> list:
        out: list = [None] * n
        bar = tqdm(total=n, desc=desc, unit="seq", leave=False)
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, n or 1))) as pool:
            futures = {pool.submit(fn, i): i for i in range(n)}
            try:
                for fut in futures:  # submission order; each result lands at its own index
                    out[futures[fut]] = fut.result()
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        bar.close()
        return out

    def chat(self, conversations, params, desc="sampling"):
        convs = list(conversations)

        def one(i: int) -> str:
            resp = self._request("/chat/completions", self._body(convs[i], params, params.seed * SEED_STRIDE + i))
            usage = resp.get("usage") or {}
            with self._lock:
                self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.completion_tokens += int(usage.get("completion_tokens") or 0)
            text = ((resp.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
            return cut_at_stop(text, params.stop).strip()

        return self._map(one, len(convs), desc)

    def option_logprobs(self, conversations, options: Sequence[str]) -> list[list[float]]:
        """Log-probs of each option's first token at the next position, from the top-K log-probs.

        A conversation ending in an assistant message is continued (vLLM's and SGLang's
        `continue_final_message`); otherwise the assistant turn is opened. Options outside
        the server's top K get the K-th log-prob (see `_option_match`).
        """
        convs = list(conversations)

        def one(i: int) -> list[float]:
            cont = bool(convs[i]) and convs[i][-1].get("role") == "assistant"
            body = {"model": self.model, "messages": convs[i], "max_tokens": 1, "temperature": 0.0,
                    "logprobs": True, "top_logprobs": self.top_logprobs}
            if cont:
                body.update(add_generation_prompt=False, continue_final_message=True)
            resp = self._request("/chat/completions", body)
            content = (((resp.get("choices") or [{}])[0].get("logprobs") or {}).get("content") or [])
            if not content or not content[0].get("top_logprobs"):
                raise UserError(f"sampler: the server at {self.base_url} returned no log-probs; this stage "
                                "needs log-probs (use sampler=hf, sampler=vllm, or a server such as vllm serve)")
            top = content[0]["top_logprobs"]
            return _option_match(options, top, min(float(t["logprob"]) for t in top))

        return self._map(one, len(convs), "option log-probs")


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read().decode(errors="replace")
        body = json.loads(raw)
        detail = body.get("detail") or body.get("error") or body.get("message") or raw
        if isinstance(detail, dict):
            detail = detail.get("message") or json.dumps(detail)
    except Exception:  # noqa: BLE001 - a non-JSON error page
        detail = e.reason
    return " ".join(str(detail).split())[:300]


class VLLMSampler:
    """vLLM's offline engine: one batched `LLM.chat` call per stage request."""

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, max_model_len: int | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, seed: int = 0):
        check_vllm(tensor_parallel_size)
        import vllm

        self.settings = dict(tensor_parallel_size=tensor_parallel_size,
                             gpu_memory_utilization=gpu_memory_utilization,
                             enable_prefix_caching=enable_prefix_caching, max_model_len=max_model_len,
                             dtype=dtype)
        self.model_path, self.version = model_path, vllm.__version__
        self.completion_tokens = 0
        try:
            self.llm = vllm.LLM(model=model_path, trust_remote_code=trust_remote_code, seed=seed,
                                **{k: v for k, v in self.settings.items() if v is not None})
        except (ValueError, RuntimeError) as e:
            raise UserError(f"sampler=vllm: cannot start vLLM on {model_path}: {str(e).splitlines()[0]}") from e
        self.tokenizer = self.llm.get_tokenizer()

    def describe(self) -> dict:
        return {"engine": "vllm", "version": self.version, "model": self.model_path, **self.settings}

    def _params(self, params: SamplingParams, seed: int):
        import vllm

        greedy = params.temperature <= 0
        return vllm.SamplingParams(n=1, max_tokens=params.max_new_tokens, seed=seed,
                                   temperature=0.0 if greedy else params.temperature,
                                   top_p=1.0 if greedy else params.top_p,
                                   repetition_penalty=params.repetition_penalty,
                                   stop=list(params.stop) or None)

    def chat(self, conversations, params, desc="sampling"):
        convs = [list(c) for c in conversations]
        if not convs:
            return []
        sps = [self._params(params, params.seed * SEED_STRIDE + i) for i in range(len(convs))]
        try:
            outs = self.llm.chat(convs, sampling_params=sps, use_tqdm=True)
        except ValueError as e:  # e.g. a prompt longer than max_model_len
            raise UserError(f"sampler=vllm: {str(e).splitlines()[0]}") from e
        texts = []
        for o in outs:  # vLLM returns outputs in input order
            self.completion_tokens += len(o.outputs[0].token_ids)
            texts.append(cut_at_stop(o.outputs[0].text, params.stop).strip())
        return texts

    def option_logprobs(self, conversations, options: Sequence[str]) -> list[list[float]]:
        """Exact log-probs: each option's first token id appended to the rendered prompt, scored
        with `prompt_logprobs` (one extra token per option; the shared prefix is cached)."""
        import vllm
        from vllm.inputs import TokensPrompt

        firsts = [self.tokenizer.encode(o, add_special_tokens=False)[0] for o in options]
        prompts = []
        for conv in conversations:
            cont = bool(conv) and conv[-1].get("role") == "assistant"
            ids = self.tokenizer.apply_chat_template(list(conv), tokenize=True, add_generation_prompt=not cont,
                                                     continue_final_message=cont)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding
            prompts += [TokensPrompt(prompt_token_ids=ids + [t]) for t in firsts]
        sp = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate(prompts, sampling_params=sp, use_tqdm=False)
        flat = []
        for o, p in zip(outs, prompts):
            last = o.prompt_logprobs[-1]
            flat.append(float(last[p["prompt_token_ids"][-1]].logprob))
        k = len(options)
        return [flat[i:i + k] for i in range(0, len(flat), k)]

    def close(self) -> None:
        """Free the engine's GPU memory before training runs in this process."""
        import gc

        self.llm = None
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort
            pass


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_tensor_parallel(tensor_parallel_size: int) -> None:
    gpus = visible_gpus()
    if tensor_parallel_size > 1 and tensor_parallel_size > gpus:
        raise UserError(f"sampler.tensor_parallel_size={tensor_parallel_size}: only {gpus} GPU(s) visible")


def check_vllm(tensor_parallel_size: int = 1) -> None:
    """The two things sampler=vllm needs before any model loads (the GPU check first: it
    does not need vllm, and a tensor-parallel request on a machine without GPUs is the
    more basic mistake)."""
    import importlib.util

    check_tensor_parallel(tensor_parallel_size)
    if importlib.util.find_spec("vllm") is None:
        raise UserError(VLLM_INSTALL)


def hf_sampler(scfg, model, tokenizer, batch_size: int | None = None) -> HFSampler:
    """An HFSampler with the `sampler.*` settings it reads (batch_size: sampler.batch_size unless
    given). Keys added after a config was written fall back to HFSampler's defaults."""
    extra = {k: scfg[k] for k in ("memory_budget_gib", "prefill_rows") if k in scfg}
    return HFSampler(model, tokenizer, batch_size=batch_size or scfg.batch_size, prefix_cache=scfg.prefix_cache,
                     max_batch_tokens=scfg.max_batch_tokens, **extra)


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
