"""HFSampler's optimisations keep greedy outputs: the shared-prefix KV cache, token-budget
batches and unsorted batches all give the same tokens as one conversation at a time, and our
decoding loop gives the tokens transformers' generate gives on the same prefilled cache."""
import pytest
import torch

from selftrain import UserError
from selftrain.models import load_model, load_tokenizer
from selftrain.engines.base import SamplingParams
from selftrain.engines.hf import HFSampler
from selftrain.kernels.batching import pad_id
from selftrain.kernels.kv_cache import ReservedLayer, kv_bytes_per_token
from selftrain.config.checks import validate

from conftest import TINY_OVERRIDES, compose

# A few-shot transcript shared by every request, as in the critique stage
SHARED = [{"role": "user", "content": "Tell me a long story about a dragon who learns to cook soup"},
          {"role": "assistant", "content": "Once upon a time a dragon wanted to cook soup for the whole village. "
                                           "It asked the baker, the miller and the fisher what to put in it, and "
                                           "each told it something different, so it cooked all of them at once."}]
CONVS = [SHARED + [{"role": "user", "content": t}] for t in
         ["Hi", "What is the capital of France?", "2+2?", "Explain photosynthesis briefly please", "ok",
          "Write a poem about the sea and the moon and the stars"]]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.1)


class Unsorted(HFSampler):
    """Reference: batches of batch_size rows in input order, not sorted by length."""

    def _batches(self, lengths, max_new_tokens):
        return [list(range(i, min(i + self.batch_size, len(lengths)))) for i in range(0, len(lengths), self.batch_size)]


class GenerateLoop(HFSampler):
    """Reference: transformers' generate decodes each prefilled batch instead of our loop (`_decode`)."""

    def _decode(self, cache, rows, mask, params, eos_ids, entropy=False):
        return self._generate(rows, mask, cache, params, pad_id(self.tokenizer), eos_ids), None


@pytest.fixture(scope="module")
def parts(tiny_model):
    model, tok = load_model(str(tiny_model)), load_tokenizer(str(tiny_model))
    # The random init's tiny logits make every row repeat one token; larger weights make the
    # continuation depend on the context, so a wrong cache or position would change the tokens.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    return model, tok


def test_prefix_cache_keeps_greedy_tokens(parts):
    with_cache = HFSampler(*parts, batch_size=4, prefix_cache=True)
    a = with_cache.generate_ids(CONVS, GREEDY)
    assert with_cache.stats["prefix_tokens_reused"] > 0  # the cache was used
    b = HFSampler(*parts, batch_size=4, prefix_cache=False).generate_ids(CONVS, GREEDY)
    one = HFSampler(*parts, batch_size=1, prefix_cache=False).generate_ids(CONVS, GREEDY)
    assert a == b == one
    assert len({tuple(r) for r in a}) > 1 and any(len(set(r)) > 2 for r in a)  # not a degenerate model


def test_prefix_cache_keeps_seeded_samples(parts):
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert (HFSampler(*parts, batch_size=3, prefix_cache=True).chat(CONVS, p)
            == HFSampler(*parts, batch_size=3, prefix_cache=False).chat(CONVS, p))


def test_no_shared_prefix_means_no_cache(parts):
    convs = [[{"role": "user", "content": t}] for t in ("Hi", "What is the capital of France?")]
    s = HFSampler(*parts, batch_size=2)
    s.generate_ids(convs, GREEDY)
    assert s.stats["prefix_tokens_reused"] == 0  # ChatML shares only a few tokens: below the minimum


def test_prefix_length_is_what_the_rows_share(parts):
    s = HFSampler(*parts)
    ids = s.tokenizer([s.render(c) for c in CONVS], add_special_tokens=False)["input_ids"]
    n, kv = s._prefix(ids)
    assert n >= HFSampler.MIN_PREFIX_TOKENS and kv is not None
    assert all(x[:n] == ids[0][:n] for x in ids) and len({x[n] for x in ids if len(x) > n}) > 1


def test_token_budget_batches_and_unsorted_keep_tokens(parts):
    ref = HFSampler(*parts, batch_size=1, prefix_cache=False).generate_ids(CONVS, GREEDY)
    budget = HFSampler(*parts, batch_size=16, max_batch_tokens=200)
    lengths = [60, 50, 40, 30, 20, 10]
    batches = budget._batches(lengths, 10)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) * (max(lengths[i] for i in b) + 10) <= 200 or len(b) == 1 for b in batches)
    assert len(batches) > 1
    assert budget.generate_ids(CONVS, GREEDY) == ref
    assert Unsorted(*parts, batch_size=4).generate_ids(CONVS, GREEDY) == ref


def test_stats_count_new_tokens(parts):
    s = HFSampler(*parts, batch_size=4)
    rows = s.generate_ids(CONVS, GREEDY)
    st = s.take_stats()
    assert st["new_tokens"] == sum(len(r) for r in rows) and 0 < st["new_tokens"] <= 10 * len(CONVS)
    assert st["sequences"] == len(CONVS) and st["batches"] == 2 and st["tokens_per_s"] > 0
    assert s.take_stats()["new_tokens"] == 0  # take_stats resets


def test_max_batch_tokens_must_be_positive(tiny_model):
    cfg = compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}", "sampler.max_batch_tokens=0"])
    with pytest.raises(UserError, match="sampler.max_batch_tokens=0"):
        validate(cfg)


def test_memory_budget_sets_the_batch_token_budget(parts):
    model = parts[0]
    c = model.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert kv_bytes_per_token(model) == per_token
    s = HFSampler(*parts, batch_size=16, memory_budget_gib=200 * per_token / 2**30)
    assert s.max_batch_tokens == 200
    ref = HFSampler(*parts, batch_size=1, prefix_cache=False).generate_ids(CONVS, GREEDY)
    assert s.generate_ids(CONVS, GREEDY) == ref
    assert s.take_stats()["batches"] > 1  # 16 rows would not fit in 200 tokens of cache
    assert HFSampler(*parts, batch_size=16, max_batch_tokens=50, memory_budget_gib=1.0).max_batch_tokens == 50


# Prompts of very different lengths, with and without the shared few-shot prefix
RAGGED = CONVS + [[{"role": "user", "content": t}] for t in
                  ["Hi", "Name three rivers in Europe and say which one is the longest and why", "x"]]


@pytest.mark.parametrize("prefill_rows", [1, 2, 3, None])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_grouped_prefill_keeps_greedy_tokens(parts, prefill_rows, prefix_cache):
    """Prefill in length-sorted groups (each padded to its own longest row), copied into the
    batch's layout, gives the tokens of one conversation at a time, with or without a shared prefix."""
    ref = HFSampler(*parts, batch_size=1, prefix_cache=False).generate_ids(CONVS, GREEDY)
    got = HFSampler(*parts, batch_size=6, prefix_cache=prefix_cache, prefill_rows=prefill_rows).generate_ids(CONVS, GREEDY)
    assert got == ref
    ref = HFSampler(*parts, batch_size=1, prefix_cache=False).generate_ids(RAGGED, GREEDY)
    got = HFSampler(*parts, batch_size=16, prefix_cache=prefix_cache, prefill_rows=prefill_rows).generate_ids(RAGGED, GREEDY)
    assert got == ref


def test_grouped_prefill_builds_the_batch_cache(parts):
    """The cache holds every token but each row's last, the prefix once per row, zeros in the
    padding (one row per group here, so no padding is computed), and room for the new tokens."""
    s = HFSampler(*parts, prefill_rows=1)
    ids = s.tokenizer([s.render(c) for c in CONVS], add_special_tokens=False)["input_ids"]
    n, kv = s._prefix(ids)
    suffixes = [x[n:] for x in ids]
    width = max(len(x) for x in suffixes)
    cache = s._prefilled(suffixes, n, kv, s.tokenizer.pad_token_id, reserve=7)
    assert all(type(layer) is ReservedLayer for layer in cache.layers)
    assert cache.get_seq_length() == n + width - 1
    k0 = cache.layers[0].keys
    assert k0.shape[0] == len(CONVS) and cache.layers[0]._k.shape[2] == n + width - 1 + 7
    assert torch.equal(k0[:, :, :n], kv[0][0].expand(len(CONVS), -1, -1, -1))
    shortest = min(range(len(CONVS)), key=lambda r: len(suffixes[r]))
    gap = width - len(suffixes[shortest])
    assert gap > 0 and not k0[shortest, :, n:n + gap].any()  # its padding, never computed
    assert k0[shortest, :, n + gap:].abs().sum() > 0  # its own suffix


def test_reserved_layer_writes_in_place_and_grows(parts):
    buf_k, buf_v = torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4, 3)
    layer = ReservedLayer(buf_k, buf_v, 1)
    step = torch.ones(2, 1, 1, 3)
    k, v = layer.update(step, 2 * step)
    assert layer.get_seq_length() == 2 and k.shape[2] == 2 and k.data_ptr() == buf_k.data_ptr()
    assert torch.equal(buf_k[:, :, 1], torch.ones(2, 1, 3)) and torch.equal(buf_v[:, :, 1], 2 * torch.ones(2, 1, 3))
    k, v = layer.update(torch.full((2, 1, 5, 3), 3.0), torch.full((2, 1, 5, 3), 4.0))  # past the reserved room
    assert layer.get_seq_length() == 7 and torch.equal(k[:, :, 1], torch.ones(2, 1, 3)) and torch.equal(v[:, :, 6], torch.full((2, 1, 3), 4.0))
    layer.crop(-3)
    assert layer.get_seq_length() == 4
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape == (1, 1, 4, 3)
    row = layer.keys.clone()
    layer.batch_repeat_interleave(3)  # beam search and num_return_sequences expand the batch this way
    assert layer.keys.shape == (3, 1, 4, 3) and all(torch.equal(layer.keys[i], row[0]) for i in range(3))
    layer.update(torch.full((3, 1, 1, 3), 5.0), torch.full((3, 1, 1, 3), 6.0))  # each copy grows on its own
    assert layer.get_seq_length() == 5 and torch.equal(layer.values[:, :, 4], torch.full((3, 1, 3), 6.0))


def test_decode_loop_gives_generates_tokens_when_rows_end_early(parts, monkeypatch):
    """Our decoding loop against transformers' generate on the same prefilled cache: the same greedy
    tokens, with rows ending at different steps and leaving the batch as they do."""
    s = HFSampler(*parts, batch_size=16)
    assert s.describe()["decode_loop"] == "selftrain"
    free = s.generate_ids(RAGGED, GREEDY)
    # a token some rows make early, some late and some never becomes the end-of-sequence token
    firsts: dict[int, set[int]] = {}  # token -> the steps at which rows first make it
    for r in free:
        for j, t in enumerate(r[:-1]):
            if t not in r[:j]:
                firsts.setdefault(t, set()).add(j)
    end = max(firsts, key=lambda t: len(firsts[t]))
    tok = parts[1]
    dropped = []
    orig = ReservedLayer.batch_select_indices
    monkeypatch.setattr(ReservedLayer, "batch_select_indices", lambda self, i: (dropped.append(len(i)), orig(self, i))[1])
    was, tok.eos_token = tok.eos_token, tok.convert_ids_to_tokens(end)
    try:
        assert tok.eos_token_id == end
        got = s.generate_ids(RAGGED, GREEDY)
        ref = GenerateLoop(*parts, batch_size=16).generate_ids(RAGGED, GREEDY)
    finally:
        tok.eos_token = was
    assert got == ref
    assert len({len(r) for r in got}) > 2 and any(r[-1] == end for r in got)
    assert dropped and min(dropped) < len(RAGGED)  # finished rows left the batch


def test_decode_loop_draws_what_generate_draws(parts):
    """Sampling with a repetition penalty: the same processing and random stream as generate with
    our nucleus processor, so the same seed gives the same text, also after rows have ended and
    left the batch (each row's uniform number is drawn whether or not its row is still there)."""
    early = 0
    for seed in range(6):
        p = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=seed)
        ours = HFSampler(*parts, batch_size=16).generate_ids(RAGGED, p)
        assert ours == GenerateLoop(*parts, batch_size=16).generate_ids(RAGGED, p)
        assert len({tuple(r) for r in ours}) > 2
        early += sum(len(r) < 8 for r in ours)
    assert early > 0  # some row ended early in some batch, so some batch shrank


def test_decode_loop_reads_the_entropy_a_scoring_pass_gives(parts):
    """The monitor's token-entropy instrument, read off the decoding pass: each row's summed
    entropy of the model's own next-token distribution (before penalty and temperature) at each
    new token but end-of-sequence equals what a scoring pass over prompt and sampled tokens gives,
    also for rows that ended early and left the batch."""
    from selftrain.monitor.behavioural import completion_logprobs

    model, tok = parts
    p = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=1)
    free = HFSampler(*parts, batch_size=16).generate_ids(RAGGED, p)
    end = max({t for r in free for t in r[1:-1]}, key=lambda t: sum(t in r[1:-1] for r in free))
    was, tok.eos_token = tok.eos_token, tok.convert_ids_to_tokens(end)
    try:
        s = HFSampler(*parts, batch_size=16)
        ids, ent = s.generate_ids(RAGGED, p, entropy=True)
        texts, ent2 = s.chat(RAGGED, p, entropy=True)
        assert ent2 == ent and texts == s.chat(RAGGED, p)
        assert GenerateLoop(*parts, batch_size=16).generate_ids(RAGGED, p, entropy=True)[1] is None
    finally:
        tok.eos_token = was
    assert any(r and r[-1] == end for r in ids) and any(len(r) == 8 and end not in r for r in ids)
    kept = [r[:-1] if r and r[-1] == end else r for r in ids]
    assert [n for _, n in ent] == [len(r) for r in kept]
    rows = [i for i, r in enumerate(kept) if r]
    prompts = [tok(s.render(c), add_special_tokens=False)["input_ids"] for c in RAGGED]
    ref = completion_logprobs(model, tok, [(prompts[i], kept[i]) for i in rows], batch_size=4, entropy=True)
    assert [ent[i][0] for i in rows] == pytest.approx(ref["entropy"], rel=1e-4, abs=1e-4)
    assert all(0 < h <= n * torch.log(torch.tensor(float(model.config.vocab_size))) + 1e-4
               for h, n in (ent[i] for i in rows))
