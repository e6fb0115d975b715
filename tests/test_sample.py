"""The hf sampler: order preserved across length-sorted batches, left padding, seeded."""
import math

import pytest

from selftrain.models import load_model, load_tokenizer
from selftrain.sample import HFSampler, SamplingParams

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
    import torch

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
    import torch

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
