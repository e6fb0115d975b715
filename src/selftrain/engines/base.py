"""What every sampling engine shares: the `Sampler` protocol the stages call, `SamplingParams`,
how stop strings end a reply, and how answer options map to first tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from selftrain import UserError
from selftrain.config.schema import SamplerConfig

Conversation = list[dict]


@dataclass(frozen=True)
class SamplingParams:
    """One sampling call's settings. The stages build it from the `sampler` keys
    (selftrain.stages.sampling); the defaults are the schema's, except the repetition penalty:
    a direct engine call gets the model's own distribution unless it asks for a penalty."""
    max_new_tokens: int = SamplerConfig.max_new_tokens
    temperature: float = SamplerConfig.temperature
    top_p: float = SamplerConfig.top_p
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # the reply ends before the first of these strings


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


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (servers differ on whether they keep it)."""
    cut = len(text)
    for s in stop:
        i = text.find(s) if s else -1
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


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
