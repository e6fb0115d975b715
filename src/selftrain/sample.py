"""Sampling: the Sampler protocol, the transformers engine, and the sample stage.

Batches are length-sorted (less padding), left-padded (decoder-only models continue from
the right edge) and built with the tokenizer's own chat template. Each batch's RNG is seeded
from the run seed and the batch's position, so the same inputs and seed give the same text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm

Conversation = list[dict]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # the reply ends before the first of these strings


class Sampler(Protocol):
    """Anything that turns chat conversations into assistant replies, order preserved."""

    def chat(self, conversations: Sequence[Conversation], params: SamplingParams,
             desc: str = "sampling") -> list[str]: ...

    def describe(self) -> dict: ...


class HFSampler:
    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def describe(self) -> dict:
        import transformers
        return {"engine": "transformers", "version": transformers.__version__,
                "batch_size": self.batch_size, "device": str(self.model.device)}

    def render(self, conversation: Conversation) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def chat(self, conversations, params, desc="sampling"):
        texts = [self.render(c) for c in conversations]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out: list[str] = [""] * len(texts)
        tok = self.tokenizer
        bar = tqdm(total=len(texts), desc=desc, unit="seq", leave=False)
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start:start + self.batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(self.model.device)
            torch.manual_seed(params.seed * 1_000_003 + b)
            greedy = params.temperature <= 0
            gen = self.model.generate(
                **enc, max_new_tokens=params.max_new_tokens, do_sample=not greedy,
                temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p, top_k=None,
                repetition_penalty=params.repetition_penalty,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
                out[i] = text.strip()
            bar.update(len(idx))
        bar.close()
        return out


def sample_stage(sampler: Sampler, prompts, params: SamplingParams) -> list[dict]:
    """Model k's initial responses: one record per prompt."""
    convs = [[{"role": "user", "content": p.text}] for p in prompts]
    responses = sampler.chat(convs, params, desc="sample")
    return [{"prompt_id": p.id, "source": p.source, "category": p.category, "prompt": p.text,
             "response": r} for p, r in zip(prompts, responses)]
