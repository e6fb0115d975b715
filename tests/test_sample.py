"""The hf sampler: order preserved across length-sorted batches, left padding, seeded."""
import math

import pytest
import torch

from selftrain.models import load_model, load_tokenizer
from selftrain.engines.base import SamplingParams
from selftrain.engines.hf import HFSampler

CONVS = [[{"role": "user", "content": t}] for t in
         ["Hi", "Tell me a long story about a dragon who learns to cook soup", "2+2?", "What is the capital of France?",
          "Explain photosynthesis briefly please", "ok"]]


@pytest.fixture(scope="module")
def sampler_parts(tiny_model):
    return load_model(str(tiny_model)), load_tokenizer(str(tiny_model))


def test_tokenizer_pads_left(sampler_parts):
    assert sampler_parts[1].padding_side == "left"


def test_greedy_batched_equals_one_at_a_time(sampler_parts):
    p = SamplingParams(max_new_tokens=8, temperature=0.0, repetition_penalty=1.0)
    batched = HFSampler(*sampler_parts, batch_size=4).chat(CONVS, p)
    single = HFSampler(*sampler_parts, batch_size=1).chat(CONVS, p)
    assert batched == single  # left padding and reordering change nothing
    assert len(batched) == len(CONVS)


def test_stop_strings_end_the_reply_before_them(tiny_model):

    model, tok = load_model(str(tiny_model)), load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights than the random init's, so replies are not empty
        for w in model.parameters():
            w.normal_(0, 0.25)
    s = HFSampler(model, tok, batch_size=4)
    p = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    full = s.chat(CONVS, p)
    target = max(range(len(full)), key=lambda i: len(full[i]))
    text = full[target]
    assert len(text) >= 6, full  # the tiny model's replies are short strings of subwords, not words
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = s.chat(CONVS, SamplingParams(**{**p.__dict__, "stop": (stop,)}))
    assert cut[target] == text[:text.find(stop)].strip()
    assert all(stop not in t for t in cut)
    assert all(f.startswith(c) for f, c in zip(full, cut))  # nothing but the cut changes


def test_sampling_is_seeded(sampler_parts):
    s = HFSampler(*sampler_parts, batch_size=3)
    a = s.chat(CONVS, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1))
    b = s.chat(CONVS, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1))
    c = s.chat(CONVS, SamplingParams(max_new_tokens=8, temperature=1.0, seed=2))
    assert a == b and a != c


def _hand_logprobs(model, tok, text: str, options):
    """Unbatched, unpadded forward over the rendered text; log-softmax of the last logits."""

    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    logp = logits - torch.logsumexp(logits, dim=-1)
    return [float(logp[tok.encode(o, add_special_tokens=False)[0]]) for o in options]


def test_option_logprobs_match_hand_computation(sampler_parts):
    model, tok = sampler_parts
    convs = [CONVS[1] + [{"role": "assistant", "content": "The answer is ("}],  # continued
             CONVS[0],  # assistant turn opened
             CONVS[3] + [{"role": "assistant", "content": "I think (A"}]]
    got = HFSampler(model, tok, batch_size=2).option_logprobs(convs, ["A", "B", "(A)"])
    texts = [tok.apply_chat_template(convs[0], tokenize=False, continue_final_message=True),
             tok.apply_chat_template(convs[1], tokenize=False, add_generation_prompt=True),
             tok.apply_chat_template(convs[2], tokenize=False, continue_final_message=True)]
    assert texts[0].endswith("The answer is (") and texts[1].endswith("<|im_start|>assistant\n")
    for g, text in zip(got, texts):
        want = _hand_logprobs(model, tok, text, ["A", "B", "(A)"])
        assert g == pytest.approx(want, abs=1e-4)
        assert all(v < 0 for v in g) and sum(math.exp(v) for v in g) < 1  # full vocabulary, not renormalised


def test_option_logprobs_refuse_options_sharing_a_first_token(sampler_parts):
    from selftrain import UserError

    with pytest.raises(UserError, match="cannot tell options 'Yes' and 'Yes, really' apart"):
        HFSampler(*sampler_parts).option_logprobs(CONVS[:1], ["Yes", "Yes, really"])


def _hf_kept(scores, temperature, top_p):
    """The token ids transformers' own temperature + top-p warpers keep, per row."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    s = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores.clone()))
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in s]


@pytest.mark.parametrize("top_p", [0.5, 0.95, 1.0])
def test_nucleus_sampling_keeps_what_transformers_keeps(top_p):
    """Peaked rows (nucleus inside the top k), middling rows (inside the top 8k) and flat rows
    (wider still: the sorted fallback): every draw lies in transformers' kept set, and a small
    kept set is fully reached."""

    from selftrain.kernels.nucleus import NucleusSampling

    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(3, 500, generator=g) * 6
    flat = torch.randn(3, 500, generator=g) * 0.1
    middling = torch.randn(3, 500, generator=g) * 2.2
    scores = torch.cat([peaked, flat, middling])
    kept = _hf_kept(scores, 0.7, top_p)
    proc = NucleusSampling(0.7, top_p, k=16)
    torch.manual_seed(0)
    seen = [set() for _ in kept]
    for _ in range(400):
        out = proc(None, scores)
        assert torch.equal((out == 0).sum(-1), torch.ones(len(kept), dtype=torch.long))
        for r, tok in enumerate(out.argmax(-1).tolist()):
            seen[r].add(tok)
    for r in range(3):  # the peaked rows' nuclei are small: 400 draws reach all of it
        assert seen[r] <= kept[r] and (top_p == 1.0 or seen[r] == kept[r])
    for r in range(3, 6):
        assert seen[r] <= kept[r] and len(kept[r]) > 128  # flat rows needed the sorted fallback
    for r in range(6, 9):
        assert seen[r] <= kept[r] and (top_p != 0.95 or 16 < len(kept[r]) <= 128)  # the top 8k held them
    if top_p == 0.95:
        assert proc.widened == 6 * 400 and proc.sorted_rows == 3 * 400
    elif top_p == 1.0:
        assert proc.sorted_rows == 9 * 400  # nothing to cut: every row is drawn from the whole vocabulary


def test_nucleus_sampling_draws_with_the_nucleus_probabilities():
    """Frequencies over 20,000 seeded draws match the renormalised nucleus probabilities."""

    from selftrain.kernels.nucleus import NucleusSampling

    scores = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -5.0]])
    p = torch.softmax(scores / 0.7, -1)[0]
    before = p.cumsum(0) - p
    nucleus = p * (before < 0.9)
    expected = nucleus / nucleus.sum()
    proc = NucleusSampling(0.7, 0.9, k=3)
    torch.manual_seed(0)
    counts = torch.zeros(7)
    for _ in range(20000):
        counts[proc(None, scores).argmax()] += 1
    freq = counts / counts.sum()
    assert freq[expected == 0].sum() == 0
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_fast_nucleus_is_seeded_and_differs_from_greedy(sampler_parts):
    p = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    a = HFSampler(*sampler_parts, batch_size=3).chat(CONVS, p)
    b = HFSampler(*sampler_parts, batch_size=3).chat(CONVS, p)
    greedy = HFSampler(*sampler_parts, batch_size=3).chat(CONVS, SamplingParams(max_new_tokens=8, temperature=0.0))
    assert a == b and a != greedy and len(a) == len(CONVS)


def test_nucleus_draw_is_per_row_and_stays_in_the_nucleus():
    """A row's token depends on its own logits and uniform number only, and u at either end of
    [0, 1) still lands inside the nucleus (the first and the last kept token)."""
    from selftrain.kernels.nucleus import NucleusSampling

    g = torch.Generator().manual_seed(1)
    scores = torch.cat([torch.randn(4, 3000, generator=g) * s for s in (6.0, 2.2, 0.1)])  # the three levels
    kept = _hf_kept(scores, 0.7, 0.9)
    proc = NucleusSampling(0.7, 0.9, k=16)
    u = torch.rand(len(scores), generator=g)
    together = proc.pick(scores, u)
    alone = torch.cat([proc.pick(scores[r:r + 1], u[r:r + 1]) for r in range(len(scores))])
    assert torch.equal(together, alone)
    for end in (0.0, 1 - 2**-24):
        picked = proc.pick(scores, torch.full((len(scores),), end)).tolist()
        assert all(t in kept[r] for r, t in enumerate(picked))
    top = scores.argmax(-1)
    assert torch.equal(proc.pick(scores, torch.zeros(len(scores))), top)  # u = 0: the most likely token


def test_packed_linears_agree_and_are_restored(monkeypatch):
    """Large linear layers run packed inside the context (same outputs), small ones stay plain,
    and every module is back afterwards."""
    import selftrain.kernels.onednn as S

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64, bias=False), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    before = [type(m) for m in model]
    x = torch.randn(5, 3, 16)
    want = model(x)
    monkeypatch.setattr(S, "PACK_MIN_WEIGHTS", 16 * 64)
    with torch.inference_mode(), S.packed_linears(model):
        if torch.backends.mkldnn.is_available():
            assert type(model[0]) is not torch.nn.Linear and type(model[2]) is torch.nn.Linear
        got = model(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert [type(m) for m in model] == before


def test_packed_linears_fuse_a_gated_mlp_and_nest(monkeypatch):
    """A LLaMA-style MLP runs as packed matmuls with SiLU and the gate's product fused (same
    outputs); an MLP with another activation is only packed; a nested context changes nothing
    and everything is back afterwards."""
    import selftrain.kernels.onednn as S
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=96, hidden_act="silu"))
    gelu = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=96, hidden_act="gelu"))
    model = torch.nn.ModuleList([mlp, gelu])
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 5, 32)
    want = [m(x) for m in model]
    monkeypatch.setattr(S, "PACK_MIN_WEIGHTS", 32 * 96)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    with torch.inference_mode(), S.packed_linears(model, 8):
        assert "forward" in vars(mlp) and type(mlp.gate_proj) is torch.nn.Linear  # fused, children untouched
        assert "forward" not in vars(gelu) and type(gelu.gate_proj) is S._PackedLinear
        with S.packed_linears(model, 8):
            assert type(mlp.gate_proj) is torch.nn.Linear  # the fused MLP's own layers are not packed again
            got = [m(x) for m in model]
        assert "forward" in vars(mlp)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(mlp) and type(gelu.gate_proj) is torch.nn.Linear
