"""The hf sampler: order preserved across length-sorted batches, left padding, seeded."""
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


def test_sampling_is_seeded(sampler_parts):
    s = HFSampler(*sampler_parts, batch_size=3)
    a = s.chat(CONVS, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1))
    b = s.chat(CONVS, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1))
    c = s.chat(CONVS, SamplingParams(max_new_tokens=8, temperature=1.0, seed=2))
    assert a == b and a != c
