"""Shared fixtures: a tiny random Llama (seconds), Hydra composition, the embedded model."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _share_cores_between_xdist_workers() -> None:
    """Under pytest-xdist (`make test` runs -n), each worker's torch gets its share of the cores:
    two workers each spreading over every core would oversubscribe them. Set before torch is
    imported (it reads OMP_NUM_THREADS once); the subprocesses a test starts inherit it. A value
    the caller set wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = str(max(1, cores // workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, share)
    if "torch" in sys.modules:  # a plugin imported it first
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_cores_between_xdist_workers()

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tiny_model(out: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama with a small byte-level BPE tokenizer and ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["prompt"] for f in ("red_team", "helpful")
             for line in open(ROOT / "src/selftrain/prompts" / f"{f}.jsonl")]
    texts += ["Yes", "No", "(A)", "(B)", "I would", "I will not"] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def compose(overrides: list[str] | None = None):
    """Compose the real config tree, as the CLI would (without running Hydra's job)."""
    from hydra import compose as hcompose, initialize_config_dir

    from selftrain.paths import conf_dir
    from selftrain.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides or [])


TINY_OVERRIDES = [
    "experiment=smoke", "sampler.max_new_tokens=12", "critique.critique_max_new_tokens=8",
    "critique.revision_max_new_tokens=12", "probes.max_items_per_dimension=3", "train.sft.learning_rate=1e-2",
    "data.min_words=1", "monitor.embedding_prompts=8", "monitor.permutations=100",
    # plumbing on a few items: these tests check the machinery, not the monitor's power
    "monitor.allow_underpowered=true", "probes.dimensions=null",
]


MINI_SUITE = str(Path(__file__).parent / "data" / "mini_suite")
# One trained generation on the mini suite, greedy and monitor-light: runs whose artifacts are
# compared byte for byte (kill and resume, locking, requeue).
GREEDY_ARGS = TINY_OVERRIDES + [
    "generations=1", f"probes.suite={MINI_SUITE}", "probes.max_items_per_dimension=null",
    "data.max_top_trigram_share=1.0",
    "monitor.activations=false", "monitor.embedding=false", "monitor.collapse=false", "monitor.cue_gap=false",
    # greedy; the random tiny model needs a strong repetition penalty to write anything but newlines
    "sampler.temperature=0", "sampler.repetition_penalty=5.0", "sampler.chunk_size=2",
]


def finished_run(args: list[str], tmp_path_factory) -> Path:
    """One uninterrupted run of `args`, shared read-only by a module: copy before changing."""
    from selftrain.run.loop import run

    d = tmp_path_factory.mktemp("finished") / "run"
    assert run(compose(args), d)["status"] == "done"
    return d


@pytest.fixture
def tiny_cfg(tiny_model):
    return compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}"])


@pytest.fixture(scope="session")
def tiny_run_1gen(tiny_model, tmp_path_factory) -> Path:
    """One trained generation of the tiny model (gen-000, gen-001), shared read-only: copy before changing."""
    from selftrain.run.loop import run

    suite = str(Path(__file__).parent / "data" / "mini_suite")
    cfg = compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}", f"probes.suite={suite}",
                                    "probes.max_items_per_dimension=null", "generations=1",
                                    "data.max_top_trigram_share=1.0", "monitor.embedding=false"])
    run_dir = tmp_path_factory.mktemp("run1gen") / "run"
    run(cfg, run_dir)
    return run_dir


def write_sft_data(folder: Path, n: int) -> Path:
    """A small SFT dataset (`messages` rows) saved where train_sft reads it."""
    from datasets import Dataset

    rows = [{"prompt_id": str(i), "messages": [{"role": "user", "content": f"Question {i}?"},
                                                {"role": "assistant", "content": f"A careful answer number {i}."}]}
            for i in range(n)]
    Dataset.from_list(rows).save_to_disk(str(folder))
    return folder
