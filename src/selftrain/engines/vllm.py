"""vLLM's offline engine in this process (`VLLMSampler`: batched chat, tensor parallel, prefix
caching for the long constitution prefix every critique request shares), and the checks
sampler=vllm needs before any model loads. vllm is an optional extra, imported only here and
only when chosen."""
from __future__ import annotations

from typing import Sequence

from selftrain import UserError
from selftrain.config.schema import SamplerConfig
from selftrain.engines.base import SamplingParams, cut_at_stop
from selftrain.run import seeds

VLLM_INSTALL = "sampler=vllm needs vllm: pip install 'selftrain[vllm]'"


class VLLMSampler:
    """vLLM's offline engine: one batched `LLM.chat` call per stage request."""

    def __init__(self, model_path: str, tensor_parallel_size: int = SamplerConfig.tensor_parallel_size,
                 gpu_memory_utilization: float = SamplerConfig.gpu_memory_utilization,
                 enable_prefix_caching: bool = SamplerConfig.enable_prefix_caching,
                 max_model_len: int | None = SamplerConfig.max_model_len, dtype: str = "auto",
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
        sps = [self._params(params, seeds.request(params.seed, i)) for i in range(len(convs))]
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
