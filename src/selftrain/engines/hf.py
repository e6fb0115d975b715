"""Sampling: the Sampler protocol, the transformers engine, and the sample stage.

Batches are length-sorted (less padding), left-padded (decoder-only models continue from
the right edge) and built with the tokenizer's own chat template. Each batch's RNG is seeded
from the run seed and the batch's position, so the same inputs and seed give the same text.
A prefix shared by every request of a call is computed once and its KV cache reused
(measured by benchmarks/critique.py).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache, DynamicLayer

from selftrain import UserError
from selftrain.run.resume import chunk_params, run_chunks
from selftrain.run import seeds

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

    def option_logprobs(self, conversations: Sequence[Conversation], options: Sequence[str]) -> list[list[float]]:
        """Per conversation, the natural-log probability of each option's first token at the next
        position (full-vocabulary log-softmax, not renormalised over the options). A conversation
        ending with an assistant message is continued; otherwise the assistant turn is opened."""
        ...


class NucleusSampling:
    """Temperature and top-p sampling: `pick` for our decoding loop, or as a logits processor,
    after which `generate` picks greedily.

    transformers' own sampling sorts the whole vocabulary for top-p and draws with
    `torch.multinomial` over all of it. For SmolLM2 (49,152 tokens) at batch 64 that was 121 ms
    (sort) + 64 ms (the draw) of a 560 ms decoding step on this 2-core CPU (torch profiler,
    2026-11-27). Here the nucleus is looked for among the `k` most likely tokens (`torch.topk`,
    5.6 ms for k=256), then among the top 8k for rows whose nucleus is larger, then in the whole
    sorted vocabulary for rows flatter still, and the draw is among the nucleus alone: one
    uniform number per row, inverted through the row's cumulative kept mass. As a processor it
    returns 0 for the drawn token and -inf elsewhere, so greedy selection takes it.
    The kept set is the one transformers' TopPLogitsWarper keeps and the draw has the same
    distribution (tests/test_sample.py); the random stream differs, so a seed gives other text
    than transformers' sampling would, and the same text on every rerun.
    """

    def __init__(self, temperature: float, top_p: float, k: int = 256):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"NucleusSampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.temperature, self.top_p, self.k = temperature, top_p, k
        self.widened = 0  # rows whose nucleus did not fit in the top k (for tests and benchmarks)
        self.sorted_rows = 0  # rows whose nucleus did not fit in the top 8k either: sorted whole

    def _draw(self, probs: torch.Tensor, idx: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Rows of descending probabilities and their token ids: one draw from each row's nucleus,
        by inverting its cumulative kept mass at the row's uniform number `u`."""
        before = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each one
        keep = before < self.top_p
        keep[:, 0] = True
        mass = (probs * keep).cumsum(-1)
        j = torch.searchsorted(mass, (u * mass[:, -1])[:, None], right=True)
        j = torch.minimum(j, keep.sum(-1, keepdim=True) - 1)  # rounding at u ~ 1 stays in the nucleus
        return idx.gather(1, j).squeeze(1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, self.pick(scores)[:, None], 0.0)
        return out

    def pick(self, scores: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """One token id per row of logits, drawn from its nucleus with the row's uniform number in
        `u` (default: `torch.rand` per row). One number per row, whatever level the row's nucleus
        is found at, so a row's draw does not depend on the other rows."""
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        n, vocab = probs.shape
        u = torch.rand(n, device=scores.device) if u is None else u
        chosen = torch.empty(n, dtype=torch.long, device=scores.device)
        rows = None  # the rows still without a draw (None: all of them)
        # On a GPU the whole vocabulary sorts in about a millisecond, and each level below would
        # wait on the device (`fits.any()`, boolean indexing): there every row is sorted whole.
        if self.top_p < 1 and scores.device.type == "cpu":
            # The top k, then the top 8k, then the whole sorted vocabulary. Sorting a flat row
            # cost ~1.9 ms against ~0.2 ms for its top 2048 (2 cores, 49,152 tokens).
            for k in (self.k, 8 * self.k):
                if k >= vocab:
                    break
                top, idx = torch.topk(probs if rows is None else probs[rows], k, dim=-1)
                # a row fits when its top k hold top_p of the mass: then its nucleus is among them
                fits = top.sum(-1) >= self.top_p
                ids = torch.arange(n, device=scores.device) if rows is None else rows
                if fits.any():
                    chosen[ids[fits]] = self._draw(top[fits], idx[fits], u[ids[fits]])
                rows = ids[~fits]
                if k == self.k:
                    self.widened += len(rows)
                if len(rows) == 0:
                    break
        if rows is None:
            self.sorted_rows += n
            full, fidx = torch.sort(probs, dim=-1, descending=True)
            return self._draw(full, fidx, u)
        if len(rows):
            self.sorted_rows += len(rows)
            full, fidx = torch.sort(probs[rows], dim=-1, descending=True)
            chosen[rows] = self._draw(full, fidx, u[rows])
        return chosen


def plain_cache(cache) -> bool:
    """A cache of plain DynamicLayers, whose rows can be expanded, selected and copied."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def expanded_cache(kv, rows: int, config) -> DynamicCache:
    """A shared prefix's per-layer (keys, values), one row each, as a cache of `rows` rows.
    expand() makes views; the cache concatenates new keys onto them, never writing in place."""
    return DynamicCache([(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in kv], config=config)


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers reserved up front for the whole
    generation. DynamicLayer concatenates every new token onto its cache, copying all of it: at
    batch 64 with ~150 cached tokens that was 32 ms of a 270 ms decoding step on this 2-core CPU
    (torch profiler, 2026-11-27). Here each step writes its token in place and attention reads a
    view of the filled part; a buffer that runs out is doubled."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._k, self._v, self._n = keys, values, length
        self.device, self.is_initialized = keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffers exist already
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        n, m = self._n, self._n + key_states.shape[-2]
        if m > self._k.shape[-2]:
            grow = max(m, 2 * self._k.shape[-2]) - self._k.shape[-2]
            self._k = torch.cat([self._k, self._k.new_zeros(*self._k.shape[:2], grow, self._k.shape[3])], dim=-2)
            self._v = torch.cat([self._v, self._v.new_zeros(*self._v.shape[:2], grow, self._v.shape[3])], dim=-2)
        self._k[:, :, n:m], self._v[:, :, n:m] = key_states, value_states
        self._n = m
        self._views()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            self._n = max(0, self._n + tokens_to_remove)
            self._views()
        else:
            super().crop(tokens_to_remove)  # its error for the legacy positive form

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
        self._views()


class HFSampler:
    """transformers `generate` on length-sorted, left-padded batches.

    When every conversation of a call starts with the same tokens (the chat template's system
    prompt, the constitution's few-shot transcripts in the critique stage), those tokens are run
    through the model once and their KV cache is shared by every row of every batch
    (`prefix_cache`); rows are then padded between the shared prefix and their own suffix, so
    each token keeps its position. Greedy outputs equal those without the cache
    (tests/test_sample_prefix.py). `max_batch_tokens` sizes batches by a KV-cache budget instead of a
    fixed row count. Token counts since the last `take_stats()` are kept in `stats`.
    """

    # A shared prefix shorter than this is not worth a separate forward pass. Measured (2-core CPU,
    # 2026-11-27, SmolLM2-135M): the critique stage's few-shot prefix (~475 tokens) ran 1.3-1.8x
    # faster with the cache; the sample stage's system prompt (24 tokens of ~45 per prompt) ran 1.25x
    # faster at batch 64 on a quiet machine (190.7 against 152.8 tokens/s, 128 prompts, same text).
    # An earlier 0.83x at batch 16 was on a shared, noisy machine.
    MIN_PREFIX_TOKENS = 16

    def __init__(self, model, tokenizer, batch_size: int = 16, prefix_cache: bool = True,
                 max_batch_tokens: int | None = None, sort_by_length: bool = True, fast_nucleus: bool = True,
                 memory_budget_gib: float | None = None, prefill_rows: int | None = 8,
                 reserve_cache: bool = True, decode_loop: bool = True, pack_linears: bool = True):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prefill_rows = prefill_rows  # rows per prompt-prefill pass; None: generate prefills the whole batch
        self.reserve_cache = reserve_cache  # with prefill_rows: decode into a KV cache reserved up front
        self.decode_loop = decode_loop  # with a reserved cache: our decoding loop (_decode), not generate
        self.pack_linears = pack_linears  # on CPU: the large linear layers through oneDNN, packed (packed_linears)
        self.memory_budget_gib = memory_budget_gib
        if max_batch_tokens is None and memory_budget_gib is not None:
            max_batch_tokens = max(1, int(memory_budget_gib * 2**30 // kv_bytes_per_token(model)))
        self.prefix_cache, self.max_batch_tokens, self.sort_by_length = prefix_cache, max_batch_tokens, sort_by_length
        self.fast_nucleus = fast_nucleus  # NucleusSampling instead of transformers' own sampling
        self.stats = self._zero_stats()

    @staticmethod
    def _zero_stats() -> dict:
        return {"sequences": 0, "batches": 0, "prompt_tokens": 0, "prefix_tokens_reused": 0,
                "new_tokens": 0, "generate_s": 0.0}

    def take_stats(self) -> dict:
        """Counts since the last call (or construction), with tokens/s of the generate calls; resets them."""
        s, self.stats = self.stats, self._zero_stats()
        s["generate_s"] = round(s["generate_s"], 3)
        s["tokens_per_s"] = round(s["new_tokens"] / s["generate_s"], 2) if s["generate_s"] > 0 else None
        return s

    def describe(self) -> dict:
        import transformers
        return {"engine": "transformers", "version": transformers.__version__,
                "batch_size": self.batch_size, "max_batch_tokens": self.max_batch_tokens,
                "memory_budget_gib": self.memory_budget_gib,
                "nucleus": "selftrain top-k bounded" if self.fast_nucleus else "transformers",
                "prefix_cache": self.prefix_cache,
                "prefill_rows": self.prefill_rows if self.model.device.type == "cpu" or not self.prefill_rows
                else "whole batch",
                "decode_loop": ("selftrain" if self.fast_nucleus else "selftrain when greedy, else generate")
                if self.decode_loop and self.prefill_rows and self.reserve_cache else "generate",
                "device": str(self.model.device)}

    def render(self, conversation: Conversation) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def _batches(self, lengths: list[int], max_new_tokens: int) -> list[list[int]]:
        """Row indices per batch: longest first (less padding), at most batch_size rows, and with a
        token budget at most max_batch_tokens slots of KV cache (rows x (longest + new tokens))."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if self.sort_by_length \
            else list(range(len(lengths)))
        batches: list[list[int]] = []
        for i in order:
            cur = batches[-1] if batches else None
            if cur is not None and len(cur) < self.batch_size and (
                    self.max_batch_tokens is None
                    or (len(cur) + 1) * (max(lengths[j] for j in cur + [i]) + max_new_tokens) <= self.max_batch_tokens):
                cur.append(i)
            else:
                batches.append([i])
        return batches

    def _prefix(self, ids: list[list[int]]):
        """(length, per-layer keys/values) of the token prefix all `ids` share, or (0, None)."""
        if not self.prefix_cache or len(ids) < 2:
            return 0, None
        n = min(len(x) for x in ids) - 1  # every row keeps at least one token to run
        first = ids[0]
        for x in ids[1:]:
            k = 0
            while k < n and x[k] == first[k]:
                k += 1
            n = k
        if n < self.MIN_PREFIX_TOKENS:
            return 0, None

        out = self.model(input_ids=torch.tensor([first[:n]], device=self.model.device), use_cache=True)
        if type(out.cache) is not DynamicCache:  # e.g. recurrent-state caches: nothing to share this way
            return 0, None
        return n, [(k, v) for k, v, *_ in out.cache]

    def _prefilled(self, suffixes: list[list[int]], n_prefix: int, prefix_kv, pad: int, reserve: int = 0):
        """The KV cache of a whole batch laid out as [shared prefix][padding][own suffix], holding
        every token but each row's last, or None where the model's cache is not plain DynamicLayers.

        A left-padded batch pads every row to its longest prompt, and prefill is compute-bound,
        so padding costs as much as real tokens: in the sample stage's length-sorted batches of 64,
        28% of prompt tokens were padding. Here rows are prefilled in length-sorted groups of
        `prefill_rows`, each padded only to its own longest row, and the group caches are copied
        into the batch layout; the padding columns between hold zeros, masked like any padding.
        Positions come from the attention mask, as in `generate`, so each token keeps its position
        and greedy tokens are unchanged (tests/test_sample_prefix.py)."""

        dev, b = self.model.device, len(suffixes)
        width = max(len(x) for x in suffixes)
        order = sorted(range(b), key=lambda r: -len(suffixes[r]))
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        # On a GPU a pass over a few rows is bound by kernel launches, not arithmetic: there the
        # whole batch prefills in one pass (see the README's GPU check).
        per = self.prefill_rows if dev.type == "cpu" else b
        for start in range(0, b, per):
            group = order[start:start + per]
            w = max(len(suffixes[r]) for r in group)
            if w < 2:  # nothing but the last tokens: the prefix alone is the cache
                kv = [(k.expand(len(group), *k.shape[1:]), v.expand(len(group), *v.shape[1:]))
                      for k, v in prefix_kv] if prefix_kv is not None else None
            else:
                ids = torch.tensor([[pad] * (w - len(suffixes[r])) + suffixes[r][:-1] for r in group], device=dev)
                mask = torch.tensor([[1] * n_prefix + [0] * (w - len(suffixes[r])) + [1] * (len(suffixes[r]) - 1)
                                     for r in group], device=dev)
                pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, n_prefix:]
                cache = expanded_cache(prefix_kv, len(group), self.model.config) if prefix_kv is not None \
                    else DynamicCache(config=self.model.config)
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                                 use_cache=True, logits_to_keep=1)
                if not plain_cache(out.cache):
                    return None  # sliding-window or recurrent layers: generate prefills the batch itself
                kv = [(k, v) for k, v, *_ in out.cache]
            if kv is None:
                continue
            if not keys:
                for k, v in kv:  # room for `reserve` more tokens: decoding writes in place (ReservedLayer)
                    keys.append(k.new_zeros(b, k.shape[1], n_prefix + width - 1 + reserve, k.shape[3]))
                    values.append(v.new_zeros(b, v.shape[1], n_prefix + width - 1 + reserve, v.shape[3]))
            rows = torch.tensor(group, device=dev)
            for (k, v), K, V in zip(kv, keys, values):
                # the group's columns: [prefix][its own padding + suffixes]; the batch's: the same, shifted right
                K[rows, :, :n_prefix], V[rows, :, :n_prefix] = k[:, :, :n_prefix], v[:, :, :n_prefix]
                end = n_prefix + width - 1
                K[rows, :, end - (w - 1):end], V[rows, :, end - (w - 1):end] = k[:, :, n_prefix:], v[:, :, n_prefix:]
        if not keys:
            return None
        if not reserve:
            return DynamicCache(list(zip(keys, values)), config=self.model.config)
        cache = DynamicCache()
        cache.layers = [ReservedLayer(K, V, n_prefix + width - 1) for K, V in zip(keys, values)]
        return cache

    def _decode(self, cache, rows: list[list[int]], mask: list[list[int]], params: SamplingParams,
                eos_ids: set[int], entropy: bool = False) -> tuple[list[list[int]], list[tuple[float, int]] | None]:
        """Each row's new tokens, decoded into a prefilled ReservedLayer cache that holds every
        prompt token but the last; the same tokens `generate` gives greedily, and the same
        processing (repetition penalty, then temperature and nucleus) when sampling.

        Why not `generate`: around each forward pass it copies the logits, runs its processors on
        full-vocabulary tensors and keeps masks and ids growing by concatenation; at batch 128 that
        was ~50 ms of a ~375 ms decoding step outside the model (2-core CPU, 2026-11-27). And a
        row that has ended stays in its batch until every row has: here rows that ended leave the
        batch (their cache rows are dropped) once they are an eighth of it, so long budgets with
        ragged lengths stop paying for finished rows. The repetition penalty counts the row's own
        tokens only, not its padding.

        With `entropy`, also each row's (summed entropy in nats, count) of the model's own next-token
        distribution (before penalty and temperature) at each step that chose a kept token other
        than end-of-sequence: what `probes.collapse.mean_token_entropy` reads from a scoring pass,
        here from the logits decoding computes anyway."""
        dev, m = self.model.device, params.max_new_tokens
        b, n = len(rows), len(rows[0])
        ids = torch.tensor(rows, device=dev)
        full = torch.ones(b, n + m, dtype=torch.long, device=dev)  # the attention mask, filled as we go
        full[:, :n] = torch.tensor(mask, device=dev)
        pos = full[:, :n].sum(-1) - 1  # each row's last prompt position (positions skip padding)
        penalty = params.repetition_penalty
        # the tokens a row has seen; padding columns repeat the row's last token, so they add no penalty
        seen = torch.cat([torch.where(full[:, :n].bool(), ids, ids[:, -1:]),
                          ids.new_zeros(b, m)], dim=1) if penalty != 1.0 else None
        nucleus = NucleusSampling(params.temperature, params.top_p) if params.temperature > 0 else None
        eos = torch.tensor(sorted(eos_ids), device=dev)
        stop_window = max((len(x) for x in params.stop), default=0) + 2  # tokens: each decodes to >= 1 char
        out = torch.zeros(b, m, dtype=torch.long, device=dev)
        ent = torch.zeros(b, m, dtype=torch.float64, device=dev) if entropy else None
        length = torch.full((b,), m, device=dev)  # tokens kept per original row
        live = torch.arange(b, device=dev)  # the original row of each row still in the batch
        ended = torch.zeros(b, dtype=torch.bool, device=dev)  # per row still in the batch
        cur = ids[:, -1]
        for step in range(m):
            logits = self.model(input_ids=cur[:, None], attention_mask=full[:, :n + step],
                                position_ids=(pos + step)[:, None], cache=cache, use_cache=True).logits[:, -1].float()
            if ent is not None:
                logp = torch.log_softmax(logits, dim=-1)
                ent[live, step] = -(logp.exp() * logp).sum(-1).double()
            if seen is not None:
                cols = seen[:, :n + step]
                scored = logits.gather(1, cols)
                logits.scatter_(1, cols, torch.where(scored < 0, scored * penalty, scored / penalty))
            # every row's uniform number is drawn, ended or not, so the random stream (and so a
            # row's text) is the one generate with NucleusSampling gives, whichever rows have left
            cur = logits.argmax(-1) if nucleus is None else nucleus.pick(logits, torch.rand(b, device=dev)[live])
            out[live, step] = cur
            if seen is not None:
                seen[:, n + step] = cur
            now = torch.isin(cur, eos) & ~ended
            if params.stop:
                tails = self.tokenizer.batch_decode(out[live, max(0, step + 1 - stop_window):step + 1])
                now |= torch.tensor([any(x in t for x in params.stop) for t in tails], device=dev) & ~ended
            length[live] = torch.where(now, step + 1, length[live])
            ended |= now
            done = int(ended.sum())  # the step's one wait on the device
            if done == len(live):
                break
            if done >= max(1, len(live) // 8) and step + 1 < m:
                keep = (~ended).nonzero().flatten()
                for layer in cache.layers:
                    layer.batch_select_indices(keep)
                live, ended, cur, pos, full = live[keep], ended[keep], cur[keep], pos[keep], full[keep]
                seen = seen[keep] if seen is not None else None
        kept = [row[:k] for row, k in zip(out.tolist(), length.tolist())]
        if ent is None:
            return kept, None
        counts = [len(r) - (1 if r and r[-1] in eos_ids else 0) for r in kept]
        return kept, [(float(ent[r, :n].sum()), n) for r, n in enumerate(counts)]

    def _generate(self, rows, mask, cache, params: SamplingParams, pad: int, eos_ids: set[int]) -> list[list[int]]:
        """transformers' generate on a padded batch (its cache prefilled or not): each row's new
        tokens up to and including the first end-of-sequence token."""
        tok, dev, greedy = self.tokenizer, self.model.device, params.temperature <= 0
        extra = {"cache": cache} if cache is not None else {}
        if not greedy and self.fast_nucleus:
            from transformers import LogitsProcessorList
            extra["logits_processor"] = LogitsProcessorList([NucleusSampling(params.temperature, params.top_p)])
        hf_sampling = not greedy and not self.fast_nucleus
        gen = self.model.generate(
            input_ids=torch.tensor(rows, device=dev), attention_mask=torch.tensor(mask, device=dev),
            max_new_tokens=params.max_new_tokens, do_sample=hf_sampling,
            temperature=params.temperature if hf_sampling else None,
            top_p=params.top_p if hf_sampling else None, top_k=None,
            repetition_penalty=params.repetition_penalty,
            pad_token_id=pad, eos_token_id=tok.eos_token_id, **extra,
            # a row whose text reaches a stop string stops there (chat() cuts the string off)
            **({"stop_strings": list(params.stop), "tokenizer": tok} if params.stop else {}))
        new = []
        for row in gen[:, len(rows[0]):].tolist():
            stop = next((j for j, t in enumerate(row) if t in eos_ids), None)
            new.append(row if stop is None else row[:stop + 1])
        return new

    def chat(self, conversations, params, desc="sampling", entropy: bool = False):
        """The replies' texts; with `entropy`, (texts, entropies) as `generate_ids` gives them."""
        rows, ent = self.generate_ids(conversations, params, desc, entropy=True) if entropy \
            else (self.generate_ids(conversations, params, desc), None)
        texts = [cut_at_stop(t, params.stop).strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
        return (texts, ent) if entropy else texts

    def generate_ids(self, conversations, params, desc="sampling", entropy: bool = False):
        """Each conversation's new token ids, up to and including the first end-of-sequence token.

        With `entropy`, (ids, entropies): each row's (summed entropy in nats of the model's
        next-token distribution at each new token but end-of-sequence, that count), read from the
        decoding pass itself (`_decode`); None when some batch was decoded by `generate` instead."""
        with packed_linears(self.model, self.batch_size) if self.pack_linears else nullcontext():
            return self._generate_ids(conversations, params, desc, entropy)

    @torch.inference_mode()
    def _generate_ids(self, conversations, params, desc, entropy: bool = False):
        import time

        tok = self.tokenizer
        ids = tok([self.render(c) for c in conversations], add_special_tokens=False)["input_ids"]
        t0 = time.perf_counter()
        n_prefix, prefix_kv = self._prefix(ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        greedy = params.temperature <= 0
        out: list[list[int]] = [[] for _ in ids]
        ent: list[tuple[float, int]] | None = [(0.0, 0)] * len(ids) if entropy else None
        bar = tqdm(total=len(ids), desc=desc, unit="seq", leave=False)
        for b, idx in enumerate(self._batches([len(x) for x in ids], params.max_new_tokens)):
            width = max(len(ids[i]) for i in idx) - n_prefix
            # [shared prefix][padding][own suffix]; plain left padding when there is no shared prefix
            rows = [ids[i][:n_prefix] + [pad] * (width - len(ids[i]) + n_prefix) + ids[i][n_prefix:] for i in idx]
            mask = [[1] * n_prefix + [0] * (width - len(ids[i]) + n_prefix) + [1] * (len(ids[i]) - n_prefix)
                    for i in idx]
            cache = self._prefilled([ids[i][n_prefix:] for i in idx], n_prefix, prefix_kv, pad,
                                    reserve=params.max_new_tokens + 1 if self.reserve_cache else 0) \
                if self.prefill_rows and len(idx) > 1 else None
            if cache is None and prefix_kv is not None:
                cache = expanded_cache(prefix_kv, len(idx), self.model.config)
            torch.manual_seed(seeds.batch(params.seed, b))
            if self.decode_loop and isinstance(cache, DynamicCache) and cache.layers \
                    and all(type(x) is ReservedLayer for x in cache.layers) and (greedy or self.fast_nucleus):
                new, h = self._decode(cache, rows, mask, params, eos_ids, entropy=ent is not None)
            else:
                new, h = self._generate(rows, mask, cache, params, pad, eos_ids), None
            if ent is not None and h is None:
                ent = None  # generate decoded this batch: no entropies for the call
            for r, (i, row) in enumerate(zip(idx, new)):
                out[i] = row
                if ent is not None:
                    ent[i] = h[r]
                self.stats["new_tokens"] += len(row)
                self.stats["prompt_tokens"] += len(ids[i])
            self.stats["batches"] += 1
            self.stats["sequences"] += len(idx)
            bar.update(len(idx))
        self.stats["generate_s"] += time.perf_counter() - t0
        self.stats["prefix_tokens_reused"] += n_prefix * (len(ids) - 1)
        bar.close()
        return (out, ent) if entropy else out


    def _render_open(self, conversation: Conversation) -> str:
        """The conversation as text ending where the next assistant token goes."""
        if conversation and conversation[-1]["role"] == "assistant":
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False,
                                                      continue_final_message=True)
        return self.render(conversation)

    @torch.inference_mode()
    def option_logprobs(self, conversations, options):
        from selftrain.monitor.behavioural import left_padded

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


# Linear layers with at least this many weights run packed (`packed_linears`). Measured on the
# 2-core CPU (2026-11-27, fp32, 30 layers' worth, medians of 15), oneDNN on a reordered weight
# against MKL's sgemm on the plain one, dense in and out: 576x576 35-36 against 43-55 ms at 128
# rows, 6-7 against 11-12 ms at 16; 576x192 10 against 13-17 ms at 128 rows. (Through
# `torch.utils.mkldnn.MkldnnLinear`, which converts layouts every call, the small projections
# lost: 0.81-1.02x.) Below 576x192 (SmolLM2's key and value projections) nothing was measured.
PACK_MIN_WEIGHTS = 576 * 192


def _packable(m) -> bool:
    return (type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
            and m.weight.numel() >= PACK_MIN_WEIGHTS)


class _PackedLinear(torch.nn.Module):
    """An fp32 linear layer through oneDNN on a weight reordered once, dense in and dense out
    (`torch.utils.mkldnn.MkldnnLinear` converts its input to oneDNN's layout and its output back
    on every call: about 35 ms of a 128-row decoding step's MLPs, 30 layers)."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x, attr: str = "none"):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, attr, [], "")


def _gated_mlp(mlp) -> bool:
    """A LLaMA-style MLP, down(silu(gate(x)) * up(x)), with all three layers packable."""
    act = getattr(mlp, "act_fn", None)
    return (all(_packable(getattr(mlp, k, None)) for k in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def _fused_mlp_forward(gate: _PackedLinear, up: _PackedLinear, down: _PackedLinear):
    """down(silu(gate(x)) * up(x)) with the SiLU and the product done inside oneDNN's matmuls."""
    def forward(x):
        a = gate(x, "swish")
        h = torch.ops.mkldnn._linear_pointwise.binary(x, a, up.packed, up.bias, "mul")
        return down(h)
    return forward


@contextmanager
def packed_linears(model, rows: int = 128):
    """On CPU, while inside: every plain fp32 `nn.Linear` of at least PACK_MIN_WEIGHTS weights runs
    through oneDNN on a weight reordered once for about `rows` rows (`_PackedLinear`), and a
    LLaMA-style MLP (gate, up and down projections, SiLU) runs as three such matmuls with the SiLU
    and the gate's product fused into the first two. Outputs agree to ~3e-6. The reordered copies
    cost their size in memory while inside (~540 MB for SmolLM2-135M, every layer reordered).
    Layers on other devices or dtypes, and wrapped layers (LoRA), are left as they are; nesting is
    harmless (an inner context finds nothing left to pack).

    Measured (2-core CPU, 2026-11-27, 128 rows, 30 layers of SmolLM2's MLP): 108-117 ms fused,
    136-140 ms packed but unfused, 172-191 ms through `MkldnnLinear` (the earlier packing), 180-199
    ms plain; the output layer 38 against 57 (MkldnnLinear) and 80 ms (plain)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        yield
        return
    swapped, fused = [], []
    for parent in list(model.modules()):
        if _gated_mlp(parent):
            if "forward" not in vars(parent):  # else an outer packed_linears fused it already
                parent.forward = _fused_mlp_forward(*(_PackedLinear(getattr(parent, k), rows)
                                                      for k in ("gate_proj", "up_proj", "down_proj")))
                fused.append(parent)
            continue
        for name, child in list(parent.named_children()):
            if _packable(child):
                setattr(parent, name, _PackedLinear(child, rows))
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent in fused:
            del parent.forward
        for parent, name, child in swapped:
            setattr(parent, name, child)


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes: layers x (keys + values) x KV heads x head dim x dtype size."""
    c = model.config
    c = getattr(c, "text_config", None) or c
    heads = getattr(c, "num_attention_heads", 1)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return int(c.num_hidden_layers * 2 * kv_heads * head_dim * next(model.parameters()).element_size())


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


def sample_stage(sampler: Sampler, prompts, params: SamplingParams, chunk_dir: Path | None = None,
                 chunk_size: int = 64, counts: dict | None = None) -> list[dict]:
    """Model k's initial responses: one record per prompt.

    With `chunk_dir`, the prompts go in fixed chunks of `chunk_size`, each committed there as it
    finishes (selftrain.run.resume); chunk i samples with a seed made from params.seed and i alone,
    so a resumed stage writes the same records as an uninterrupted one."""
    def work(i: int, part) -> list[dict]:
        convs = [[{"role": "user", "content": p.text}] for p in part]
        p_chunk = chunk_params(params, i) if chunk_dir is not None else params
        responses = sampler.chat(convs, p_chunk, desc="sample")
        return [{"prompt_id": p.id, "source": p.source, "category": p.category, "prompt": p.text,
                 "response": r} for p, r in zip(part, responses)]

    if chunk_dir is None:
        return work(0, prompts)
    return run_chunks(chunk_dir, prompts, [p.id for p in prompts], chunk_size, work,
                      counts if counts is not None else {})
