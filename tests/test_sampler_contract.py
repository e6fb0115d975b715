"""The sampler contract: every engine behind `sampler.backend` must pass these.

- hf: HFSampler on the embedded model, always.
- openai: OpenAISampler against a real `transformers serve` (transformers[serving]) that a
  session fixture starts on a free localhost port with the embedded model folder.
- vllm: VLLMSampler, where vllm and a GPU are present; skipped with the reason otherwise.

The reference for "what the model saw" is the model itself: each conversation rendered with
the tokenizer's chat template and decoded greedily, one at a time, with plain generate().
Every engine's greedy replies must equal it, which checks templating, order and batching at
once. `transformers serve` 5.24 ignores `logprobs`/`top_logprobs` (its
UNUSED_CHAT_COMPLETION_FIELDS), so for openai the log-prob shapes are skipped with that
reason, and a separate test checks the one-line error the stage then gives. It also
samples only when the checkpoint's generation_config says do_sample (see _sampling_copy), and
its seeds reproduce only with one request in flight (see test_same_seed_same_replies).

A prompt past the embedded model's own 8192-token context costs minutes of CPU to prefill, so
hf and openai check the over-length case against a declared context of SHORT_CONTEXT tokens:
the same weights with a config saying max_position_embeddings=SHORT_CONTEXT (its rotary
embedding is the default kind, which that number does not enter). vllm refuses before any
forward pass, so it keeps the model's own context.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from selftrain import UserError, models
from selftrain.engines.base import SamplingParams
from selftrain.engines.factory import sampling_throughput
from selftrain.engines.hf import HFSampler
from selftrain.engines.openai import OpenAISampler
from selftrain.engines.vllm import VLLMSampler

pytestmark = pytest.mark.integration

STARTUP_S = 300  # the server loads the 135M model in seconds; a busy 2-core box needs more
ENGINES = ["hf", "openai", "vllm"]
# transformers serve 5.24 lacks these (each test that needs one skips with the reason):
NO_LOGPROBS = "transformers serve 5.24 ignores logprobs/top_logprobs (UNUSED_CHAT_COMPLETION_FIELDS)"
CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
     {"role": "user", "content": "Name another one."}],
]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.0, seed=0)
SHORT_CONTEXT = 256  # the context hf and openai declare for the over-length test (see the docstring)


@pytest.fixture(scope="session")
def embedded():
    path = models.resolve(models.EMBEDDED)
    return path, models.load_model(path), models.load_tokenizer(path)


@pytest.fixture(scope="session")
def reference(embedded):
    """Greedy replies of plain generate(), one conversation at a time."""
    _, model, tok = embedded
    out = []
    for conv in CONVS:
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            gen = model.generate(**ids, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sampling_copy(path: str, folder) -> str:
    """The embedded model folder with generation_config.json saying do_sample: true, and
    config.json declaring a context of SHORT_CONTEXT tokens.

    transformers serve 5.24 starts from the checkpoint's generation_config and turns
    sampling off for temperature 0, but never on for temperature > 0; the embedded
    checkpoint's config leaves do_sample false. The weights are links, not copies.
    """
    src = Path(path)
    edits = {"generation_config.json": {"do_sample": True}, "config.json": {"max_position_embeddings": SHORT_CONTEXT}}
    for f in src.iterdir():
        if f.name in edits:
            (folder / f.name).write_text(json.dumps({**json.loads(f.read_text()), **edits[f.name]}))
        else:
            (folder / f.name).symlink_to(f)
    return str(folder)


@pytest.fixture(scope="session")
def served(embedded, tmp_path_factory):
    """`transformers serve` on the embedded model; yields (its /v1 URL, the served path), stops it after."""
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("transformers[serving] is not installed (pip install 'selftrain[test]')")
    path = _sampling_copy(embedded[0], tmp_path_factory.mktemp("served"))
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", path,
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                 "--dtype", "float32", "--log-level", "warning"],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer within {STARTUP_S} s: {log.read_text()[-2000:]}")
            time.sleep(1)
        yield url, path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _vllm_or_skip():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (optional extra: pip install 'selftrain[vllm]')")
    if not torch.cuda.is_available():
        pytest.skip("vllm needs a GPU; none is visible")


_cache: dict = {}


@pytest.fixture(params=ENGINES)
def engine(request, embedded):
    name = request.param
    path, model, tok = embedded
    if name == "vllm":
        _vllm_or_skip()
    if name not in _cache:
        if name == "hf":
            _cache[name] = HFSampler(model, tok, batch_size=4)
        elif name == "openai":
            url, served_path = request.getfixturevalue("served")
            # transformers serve maps frequency_penalty f to repetition_penalty 1 + f
            _cache[name] = OpenAISampler(url, served_path, max_concurrency=2, retries=1,
                                         repetition_penalty_as="frequency_penalty")
        else:
            _cache[name] = VLLMSampler(path, gpu_memory_utilization=0.3, dtype="float32")
    return name, _cache[name]


def test_greedy_replies_are_what_the_model_says_to_the_templated_conversation(engine, reference):
    name, sampler = engine
    assert sampler.chat(CONVS, GREEDY) == reference
    info = sampler.describe()
    assert info["engine"] and (info.get("version") or info.get("base_url"))


def test_order_is_preserved(engine, reference):
    _, sampler = engine
    assert sampler.chat(CONVS[::-1], GREEDY) == reference[::-1]


def test_max_new_tokens_is_respected(engine, embedded):
    _, sampler = engine
    tok = embedded[2]
    params = SamplingParams(max_new_tokens=4, temperature=0.0, repetition_penalty=1.0)
    replies = sampler.chat([[{"role": "user", "content": "Write a long story about a dragon."}]], params)
    n = len(tok(replies[0], add_special_tokens=False)["input_ids"])
    assert 1 <= n <= 4


def test_stop_strings_end_the_reply_before_them(engine, reference):
    name, sampler = engine
    words = reference[0].split()
    assert len(words) >= 3, reference[0]
    stop = words[2]
    expected = reference[0][:reference[0].find(stop)].strip()
    params = SamplingParams(**{**GREEDY.__dict__, "stop": (stop,)})
    assert sampler.chat(CONVS[:1], params) == [expected]


def test_same_seed_same_replies(engine, request):
    name, sampler = engine
    if name == "openai":
        # transformers serve seeds the process-wide torch RNG per request (set_torch_seed), so
        # two requests in flight draw from one generator in whatever order the threads run:
        # its seeds reproduce only one request at a time. vLLM and SGLang seed per request.
        url, served_path = request.getfixturevalue("served")
        sampler = OpenAISampler(url, served_path, max_concurrency=1, retries=1,
                                repetition_penalty_as="frequency_penalty")
    hot = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=7)
    first = sampler.chat(CONVS, hot)
    assert sampler.chat(CONVS, hot) == first
    other = sampler.chat(CONVS, SamplingParams(**{**hot.__dict__, "seed": 8}))
    assert other != first  # 3 replies of 8 tokens at temperature 1: a tie is vanishingly unlikely


def test_empty_prompt_gets_a_reply(engine):
    _, sampler = engine
    replies = sampler.chat([[{"role": "user", "content": ""}], CONVS[0]], GREEDY)
    assert len(replies) == 2 and isinstance(replies[0], str) and replies[1]


def test_prompt_past_the_context_is_answered_or_refused_in_one_line(engine, embedded, request, monkeypatch):
    """No engine may crash with a traceback on a prompt longer than the model's declared context
    (SHORT_CONTEXT tokens for hf and openai, 8192 for vllm): it answers (hf and transformers
    serve run past it) or raises a one-line UserError (vLLM and vllm serve refuse past max_model_len)."""
    name, sampler = engine
    limit = embedded[1].config.max_position_embeddings
    if name == "hf":  # the sampler's model is the shared one: it declares the short context for this test only
        monkeypatch.setattr(embedded[1].config, "max_position_embeddings", SHORT_CONTEXT)
        limit = SHORT_CONTEXT
    elif name == "openai":  # the server's copy declares it (see _sampling_copy)
        limit = json.loads((Path(request.getfixturevalue("served")[1]) / "config.json").read_text())[
            "max_position_embeddings"]
    assert name == "vllm" or limit == SHORT_CONTEXT
    long = [{"role": "user", "content": "word " * (limit + 16)}]
    params = SamplingParams(**{**GREEDY.__dict__, "max_new_tokens": 1})
    try:
        replies = sampler.chat([long], params)
    except UserError as e:
        assert "\n" not in str(e)
    else:
        assert len(replies) == 1 and isinstance(replies[0], str)


def test_option_logprob_shapes(engine):
    name, sampler = engine
    if name == "openai":
        pytest.skip(NO_LOGPROBS)
    if not hasattr(sampler, "option_logprobs"):
        pytest.skip(f"{type(sampler).__name__}.option_logprobs is not in this build")
    convs = [CONVS[0], CONVS[0][:1] + [{"role": "assistant", "content": "The answer is"}]]
    options = ["Yes", "No", " Paris"]
    lp = sampler.option_logprobs(convs, options)
    assert len(lp) == 2 and all(len(row) == 3 for row in lp)
    for row in lp:
        assert all(math.isfinite(x) and x <= 0 for x in row)
        assert sum(math.exp(x) for x in row) <= 1 + 1e-4  # distinct first tokens of one distribution


def test_openai_without_logprobs_says_so_in_one_line(served):
    sampler = OpenAISampler(*served, retries=0)
    with pytest.raises(UserError, match="needs log-probs") as e:
        sampler.option_logprobs(CONVS[:1], ["Yes", "No"])
    assert "\n" not in str(e.value)


def test_openai_prompt_tokens_match_the_chat_template(served, embedded):
    """The server counted exactly the tokens of the tokenizer's own rendering."""
    tok = embedded[2]
    sampler = OpenAISampler(*served, retries=0)
    sampler.chat(CONVS, SamplingParams(max_new_tokens=1, temperature=0.0, repetition_penalty=1.0))
    expected = sum(len(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)
                       ["input_ids"]) for c in CONVS)
    assert sampler.prompt_tokens == expected


def test_openai_server_lacking_the_model_is_one_line(served):
    with pytest.raises(UserError, match="does not serve model 'no-such-model'") as e:
        OpenAISampler(served[0], "no-such-model")
    assert "\n" not in str(e.value)


def test_sampling_throughput_counts_tokens(engine, embedded):
    _, sampler = engine
    params = SamplingParams(max_new_tokens=6, temperature=0.0, repetition_penalty=1.0)
    stats = sampling_throughput(sampler, CONVS[:2], params, tokenizer=embedded[2])
    assert stats["conversations"] == 2 and 2 <= stats["new_tokens"] <= 12
    assert stats["tokens_per_s"] > 0 and stats["engine"]["engine"] == sampler.describe()["engine"]
    if "reported_new_tokens" in stats:  # the engine's own count (server usage, vLLM token ids)
        assert stats["reported_new_tokens"] >= stats["new_tokens"]
