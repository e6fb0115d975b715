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

from . import UserError

Conversation = list[dict]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int = 0


class Sampler(Protocol):
    """Anything that turns chat conversations into assistant replies, order preserved."""

    def chat(self, conversations: Sequence[Conversation], params: SamplingParams,
             desc: str = "sampling") -> list[str]: ...

    def describe(self) -> dict: ...

    def option_logprobs(self, conversations: Sequence[Conversation], options: Sequence[str]) -> list[list[float]]:
        """Per conversation, the natural-log probability of each option's first token at the next
        position (full-vocabulary log-softmax, not renormalised over the options). A conversation
        ending with an assistant message is continued; otherwise the assistant turn is opened."""
        ...


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


    def _render_open(self, conversation: Conversation) -> str:
        """The conversation as text ending where the next assistant token goes."""
        if conversation and conversation[-1]["role"] == "assistant":
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False,
                                                      continue_final_message=True)
        return self.render(conversation)

    @torch.inference_mode()
    def option_logprobs(self, conversations, options):
        from .probes.behavioural import left_padded

        firsts = option_first_tokens(self.tokenizer, options)
        tok = self.tokenizer
        seqs = [tok(self._render_open(c), add_special_tokens=False)["input_ids"] for c in conversations]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[list[float]] = [[] for _ in seqs]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        index = torch.tensor(firsts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask, pos = left_padded([seqs[i] for i in idx], pad)
            logits = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                position_ids=pos.to(self.model.device), logits_to_keep=1).logits[:, -1, :]
            logp = torch.log_softmax(logits.float(), dim=-1)[:, index.to(logits.device)].cpu()
            for r, i in enumerate(idx):
                out[i] = [float(v) for v in logp[r]]
        return out


def option_first_tokens(tokenizer, options: Sequence[str]) -> list[int]:
    """Each option's first token id; a UserError when two options share one or an option is empty."""
    firsts: list[int] = []
    for o in options:
        ids = tokenizer.encode(o, add_special_tokens=False)
        if not ids:
            raise UserError(f"labeller tokenizer maps option {o!r} to no tokens; set other preferences.options")
        firsts.append(ids[0])
    for i in range(len(options)):
        for j in range(i):
            if firsts[i] == firsts[j]:
                raise UserError(f"labeller tokenizer cannot tell options {options[j]!r} and {options[i]!r} apart: "
                                f"both start with token {firsts[i]} "
                                f"({tokenizer.convert_ids_to_tokens(firsts[i])!r}); set other preferences.options")
    return firsts


def sample_stage(sampler: Sampler, prompts, params: SamplingParams) -> list[dict]:
    """Model k's initial responses: one record per prompt."""
    convs = [[{"role": "user", "content": p.text}] for p in prompts]
    responses = sampler.chat(convs, params, desc="sample")
    return [{"prompt_id": p.id, "source": p.source, "category": p.category, "prompt": p.text,
             "response": r} for p, r in zip(prompts, responses)]
