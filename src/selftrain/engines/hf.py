"""The transformers engine: `HFSampler` runs a model in this process on length-sorted,
left-padded batches.

Batches are built with the tokenizer's own chat template, and each batch's RNG is seeded from the
run seed and the batch's position, so the same inputs and seed give the same text. A prefix shared
by every request of a call is computed once and its KV cache reused; prompts are prefilled in
small length-sorted groups into a cache reserved up front, and decoded by a loop of our own
(`_decode`) that drops finished rows. The fast paths live in selftrain.kernels, each tested
against the plain path it replaces.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from selftrain.config.schema import SamplerConfig
from selftrain.engines.base import Conversation, SamplingParams, cut_at_stop, option_first_tokens
from selftrain.kernels.batching import pad_id, padded_after_prefix, shared_prefix
from selftrain.kernels.kv_cache import (PaddedKV, expanded_cache, kv_bytes_per_token, plain_cache,
                                        reserved_cache)
from selftrain.kernels.nucleus import NucleusSampling
from selftrain.kernels.onednn import packed_linears
from selftrain.kernels.scoring import entropy as entropy_of, padded_logprobs
from selftrain.run import seeds


class HFSampler:
    """transformers on length-sorted, left-padded batches.

    When every conversation of a call starts with the same tokens (the chat template's system
    prompt, the constitution's few-shot transcripts in the critique stage), those tokens are run
    through the model once and their KV cache is shared by every row of every batch
    (`prefix_cache`); rows are then padded between the shared prefix and their own suffix, so
    each token keeps its position. Greedy outputs equal those without the cache
    (tests/test_sample_prefix.py). `max_batch_tokens` (or `memory_budget_gib`, from which it is
    derived) sizes batches by a KV-cache budget instead of a fixed row count; None for both: every
    batch has `batch_size` rows. `prefill_rows` None: transformers' generate prefills and decodes
    each whole padded batch. Token counts since the last `take_stats()` are kept in `stats`.
    """

    # A shared prefix shorter than this is not worth a separate forward pass (the sample stage's
    # 24-token system prompt still paid off: docs/performance.md).
    MIN_PREFIX_TOKENS = 16

    def __init__(self, model, tokenizer, batch_size: int = SamplerConfig.batch_size,
                 prefix_cache: bool = SamplerConfig.prefix_cache, max_batch_tokens: int | None = None,
                 memory_budget_gib: float | None = None, prefill_rows: int | None = SamplerConfig.prefill_rows):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prefill_rows = prefill_rows  # rows per prompt-prefill pass; None: generate prefills the whole batch
        self.memory_budget_gib = memory_budget_gib
        if max_batch_tokens is None and memory_budget_gib is not None:
            max_batch_tokens = max(1, int(memory_budget_gib * 2**30 // kv_bytes_per_token(model)))
        self.prefix_cache, self.max_batch_tokens = prefix_cache, max_batch_tokens
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
                "nucleus": "selftrain top-k bounded",
                "prefix_cache": self.prefix_cache,
                "prefill_rows": self.prefill_rows if self.model.device.type == "cpu" or not self.prefill_rows
                else "whole batch",
                "decode_loop": "selftrain" if self.prefill_rows else "generate",
                "device": str(self.model.device)}

    def render(self, conversation: Conversation) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def _batches(self, lengths: list[int], max_new_tokens: int) -> list[list[int]]:
        """Row indices per batch: longest first (less padding), at most batch_size rows, and with a
        token budget at most max_batch_tokens slots of KV cache (rows x (longest + new tokens))."""
        batches: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
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
        return shared_prefix(self.model, ids, self.MIN_PREFIX_TOKENS)

    def _prefilled(self, suffixes: list[list[int]], n_prefix: int, prefix_kv, pad: int, reserve: int):
        """The KV cache of a whole batch laid out as [shared prefix][padding][own suffix], holding
        every token but each row's last, with room for `reserve` more tokens (ReservedLayers), or
        None where the model's cache is not plain DynamicLayers.

        A left-padded batch pads every row to its longest prompt, and prefill is compute-bound,
        so padding costs as much as real tokens. Here rows are prefilled in length-sorted groups of
        `prefill_rows`, each padded only to its own longest row, and the group caches are copied
        into the batch layout; the padding columns between hold zeros, masked like any padding.
        Positions come from the attention mask, as in `generate`, so each token keeps its position
        and greedy tokens are unchanged (tests/test_sample_prefix.py)."""
        dev, b = self.model.device, len(suffixes)
        width = max(len(x) for x in suffixes)
        order = sorted(range(b), key=lambda r: -len(suffixes[r]))
        batch = PaddedKV(b, prefix_kv, width - 1, reserve)
        # On a GPU a pass over a few rows is bound by kernel launches, not arithmetic: there the
        # whole batch prefills in one pass (docs/performance.md, GPU check).
        per = self.prefill_rows if dev.type == "cpu" else b
        for start in range(0, b, per):
            group = order[start:start + per]
            if max(len(suffixes[r]) for r in group) < 2:
                continue  # nothing but the last tokens: the prefix alone is the group's cache
            ids, mask = padded_after_prefix([suffixes[r][:-1] for r in group], n_prefix, pad)
            ids, mask = torch.tensor(ids, device=dev), torch.tensor(mask, device=dev)
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, n_prefix:]
            cache = expanded_cache(prefix_kv, len(group), self.model.config) if prefix_kv is not None \
                else DynamicCache(config=self.model.config)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                             use_cache=True, logits_to_keep=1)
            if not plain_cache(out.cache):
                return None  # sliding-window or recurrent layers: generate prefills the batch itself
            batch.place(torch.tensor(group, device=dev),
                        [(k[:, :, n_prefix:], v[:, :, n_prefix:]) for k, v, *_ in out.cache])
        if not batch.layers:
            return None
        return reserved_cache(batch.layers, n_prefix + width - 1)

    def _decode(self, cache, rows: list[list[int]], mask: list[list[int]], params: SamplingParams,
                eos_ids: set[int], entropy: bool = False) -> tuple[list[list[int]], list[tuple[float, int]] | None]:
        """Each row's new tokens, decoded into a prefilled ReservedLayer cache that holds every
        prompt token but the last; the same tokens `generate` gives greedily, and the same
        processing (repetition penalty, then temperature and nucleus) when sampling.

        Why not `generate`: around each forward pass it copies the logits, runs its processors on
        full-vocabulary tensors and keeps masks and ids growing by concatenation, all outside the
        model and all paid at every step (docs/performance.md). And a row that has ended stays in its batch until every row has: here rows that ended leave the
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
                ent[live, step] = entropy_of(torch.log_softmax(logits, dim=-1)).double()
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
        """transformers' generate on a padded batch (its cache prefilled or not), sampling through
        NucleusSampling as a logits processor: each row's new tokens up to and including the first
        end-of-sequence token."""
        tok, dev = self.tokenizer, self.model.device
        extra = {"cache": cache} if cache is not None else {}
        if params.temperature > 0:
            from transformers import LogitsProcessorList
            extra["logits_processor"] = LogitsProcessorList([NucleusSampling(params.temperature, params.top_p)])
        gen = self.model.generate(
            input_ids=torch.tensor(rows, device=dev), attention_mask=torch.tensor(mask, device=dev),
            max_new_tokens=params.max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
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
        with packed_linears(self.model, self.batch_size):
            return self._generate_ids(conversations, params, desc, entropy)

    def _batch(self, ids: list[list[int]], n_prefix: int, prefix_kv, params: SamplingParams, pad: int,
               eos_ids: set[int], entropy: bool, seed: int):
        """One batch's new token ids and, from our decoding loop, their entropies (else None):
        prefilled into a reserved cache and decoded by `_decode` where the model's cache allows,
        else decoded by transformers' generate. The RNG is seeded with `seed` just before decoding."""
        suffixes = [x[n_prefix:] for x in ids]
        own, mask = padded_after_prefix(suffixes, n_prefix, pad)
        # [shared prefix][padding][own suffix]; plain left padding when there is no shared prefix
        rows = [x[:n_prefix] + r for x, r in zip(ids, own)]
        cache = self._prefilled(suffixes, n_prefix, prefix_kv, pad, reserve=params.max_new_tokens + 1) \
            if self.prefill_rows and len(ids) > 1 else None
        if cache is not None:
            torch.manual_seed(seed)
            return self._decode(cache, rows, mask, params, eos_ids, entropy=entropy)
        cache = expanded_cache(prefix_kv, len(ids), self.model.config) if prefix_kv is not None else None
        torch.manual_seed(seed)
        return self._generate(rows, mask, cache, params, pad, eos_ids), None

    @torch.inference_mode()
    def _generate_ids(self, conversations, params, desc, entropy: bool = False):
        tok = self.tokenizer
        ids = tok([self.render(c) for c in conversations], add_special_tokens=False)["input_ids"]
        t0 = time.perf_counter()
        n_prefix, prefix_kv = self._prefix(ids)
        pad = pad_id(tok)
        eos = tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        out: list[list[int]] = [[] for _ in ids]
        ent: list[tuple[float, int]] | None = [(0.0, 0)] * len(ids) if entropy else None
        bar = tqdm(total=len(ids), desc=desc, unit="seq", leave=False)
        for b, idx in enumerate(self._batches([len(x) for x in ids], params.max_new_tokens)):
            new, h = self._batch([ids[i] for i in idx], n_prefix, prefix_kv, params, pad, eos_ids, ent is not None,
                                 seed=seeds.batch(params.seed, b))
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
        firsts = option_first_tokens(self.tokenizer, options)
        tok = self.tokenizer
        seqs = [tok(self._render_open(c), add_special_tokens=False)["input_ids"] for c in conversations]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list[list[float]] = [[] for _ in seqs]
        index = torch.tensor(firsts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            logp, _ = padded_logprobs(self.model, [seqs[i] for i in idx], pad_id(tok), 1)
            logp = logp[:, -1, index.to(logp.device)].cpu()
            for r, i in enumerate(idx):
                out[i] = [float(v) for v in logp[r]]
        return out
