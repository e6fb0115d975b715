"""Chat completions from any OpenAI-compatible server: `vllm serve`, SGLang, TGI, llama.cpp's
server or `transformers serve`.

`OpenAISampler` talks HTTP (stdlib urllib, no client library): one chat completion per
conversation, at most `max_concurrency` in flight, retries with exponential backoff on 429, 5xx
and connection errors, a per-request timeout, a per-conversation seed, results in input order.
"""
from __future__ import annotations

import http.client
import json
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
from selftrain.config.schema import SamplerConfig
from selftrain.engines.base import Conversation, SamplingParams, cut_at_stop
from selftrain.run import seeds

# OpenAI caps top_logprobs at 20; vLLM's default max_logprobs is 20 too.
MAX_TOP_LOGPROBS = 20
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


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

    def __init__(self, base_url: str, model: str, api_key_env: str | None = SamplerConfig.api_key_env,
                 max_concurrency: int = SamplerConfig.max_concurrency, timeout_s: float = SamplerConfig.timeout_s,
                 retries: int = SamplerConfig.retries, backoff_s: float = SamplerConfig.backoff_s,
                 repetition_penalty_as: str = SamplerConfig.repetition_penalty_as,
                 top_logprobs: int = MAX_TOP_LOGPROBS, check_model: bool = SamplerConfig.check_model):
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
            resp = self._request("/chat/completions", self._body(convs[i], params, seeds.request(params.seed, i)))
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
