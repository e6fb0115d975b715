"""A corpus of bad inputs, each run the way the `selftrain` console script runs it.

The contract: an error the user caused prints exactly one non-empty line on stderr,
`selftrain: error: <message naming the file, key or value at fault>`, exits with status 2,
shows no traceback (unless HYDRA_FULL_ERROR=1) and leaves existing run data unchanged.

Every case must fail before any model loads. As a tripwire, cases that do not set
`model.name_or_path` themselves point it at a folder that does not exist, so a case whose
intended error does not fire stops at model resolution (with the wrong message) instead of
loading a model.

Most cases run in this process, through the CLI's own pieces: Hydra's compose API on the
CLI's config folder, the CLI's job wrapper (`user_errors_exit`) around the loop's `run`, and
the CLI's error printer (`run_and_report`) around both, so the line checked is the line a
user sees. A few cases (CLI_CASES) also run as real console-script subprocesses, one per
kind of failure, and every other console script once (OTHER_SCRIPTS), proving the printer,
the exit status and the absence of a traceback end to end; for CLI_CASES the in-process line
must equal the real one. Subprocesses run in parallel from one session-scoped pool: each test
waits only for its own run, and only the selected tests' runs are started.

A case that breaks the contract today is a strict xfail naming the exact set of breaches
it shows (`known`): a different set of breaches fails the test, and a fixed case XPASSes,
which strict mode turns into a failure, so the mark is removed with the fix.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

BIN = Path(sys.executable).parent  # the console scripts
DATA = Path(__file__).resolve().parent / "data"
BAD = DATA / "bad"
MINI = DATA / "mini_suite"
TIMEOUT_S = 300  # a run that gets this far has loaded something it should not have

# A relative path, resolved against each run's own working folder, where nothing exists.
TRIPWIRE = "model.name_or_path=./tripwire-no-such-model/model"

# --------------------------------------------------------------------------- the corpus

@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # overrides; <BAD>, <MINI>, <WORK> are replaced by absolute paths
    culprit: tuple[str, ...]  # substrings the error line must hold (same placeholders)
    known: frozenset = frozenset()  # breaches it shows today (a strict xfail), empty if none
    reason: str = ""
    setup: Callable[[Path], None] | None = None  # builds inputs in the run's working folder
    env: tuple[tuple[str, str], ...] = ()
    script: str = "selftrain"  # the console script that runs it

    @property
    def tripwire(self) -> bool:
        return self.script == "selftrain" and not any(a.lstrip("+").startswith("model.name_or_path=")
                                                      for a in self.args)


def _mkdir(rel: str) -> Callable[[Path], None]:
    return lambda work: (work / rel).mkdir(parents=True)


def _big_constitution(work: Path) -> None:
    text = "# " + "x" * 1_000_100 + "\n" + (BAD / "constitution" / "duplicate_id.yaml").read_text()
    (work / "big.yaml").write_text(text)


def _model_folder_without_config(work: Path) -> None:
    (work / "model_no_config").mkdir()
    (work / "model_no_config" / "README.md").write_text("weights went elsewhere\n")


def _fake_model(work: Path) -> None:
    """Passes model resolution (a config.json), but holds nothing that loads."""
    (work / "fake_model").mkdir()
    (work / "fake_model" / "config.json").write_text("{}\n")


def _tokenizer_only_model(work: Path) -> None:
    """A checkpoint folder with a word-level tokenizer that maps both "A" and "B" to <unk>, and no weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<unk>": 0, "<|im_end|>": 1, "hello": 2}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    tok.save_pretrained(work / "tok_model")
    (work / "tok_model" / "config.json").write_text('{"model_type": "llama"}\n')


def _pairs_without_chosen(work: Path) -> None:
    from datasets import Dataset

    Dataset.from_list([{"prompt": "Hi", "rejected": "Go away."}]).save_to_disk(str(work / "pairs"))


RESUME_ARGS = ("probes.suite='<MINI>'", "monitor.allow_underpowered=true", "model.name_or_path='<WORK>/fake_model'")


def _resume_literal(work: Path) -> None:
    _fake_model(work)
    (work / "run").mkdir()
    (work / "run" / "manifest.json").write_text(
        json.dumps({"config": {"seed": 99}, "schema_version": 1, "stages": {}}, indent=2) + "\n")


def _compose(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from selftrain.paths import conf_dir
    from selftrain.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)


def _resume_seed(work: Path) -> None:
    """A run folder whose manifest holds exactly this command's config but seed=99, and the
    record Hydra wrote when that earlier run started."""
    _fake_model(work)
    config = _compose([_fill(a, work) for a in RESUME_ARGS] + ["seed=99"])
    run = work / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(
        {"schema_version": 1, "created": "2025-01-01T00:00:00+00:00", "config": config, "status": "failed",
         "stages": {}}, indent=2) + "\n")
    (run / "gen-000").mkdir()
    (run / "gen-000" / "manifest.json").write_text('{"generation": 0, "stages": {}}\n')
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seed: 99\n")
    (run / ".hydra" / "overrides.yaml").write_text("- seed=99\n")


def _resume_folder(work: Path, gen0: dict | None = None, extra: tuple[str, ...] = (), files: dict | None = None):
    """A run folder started by exactly this command's config (plus `extra` overrides), with an
    optional gen-000 manifest `gen0` and files {path under run/: text}."""
    _fake_model(work)
    config = _compose([_fill(a, work) for a in RESUME_ARGS] + list(extra))
    run = work / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(
        {"schema_version": 1, "created": "2025-01-01T00:00:00+00:00", "config": config, "status": "failed",
         "stages": {}}, indent=2) + "\n")
    if gen0 is not None:
        (run / "gen-000").mkdir()
        (run / "gen-000" / "manifest.json").write_text(json.dumps({"generation": 0, **gen0}, indent=2) + "\n")
    for rel, text in (files or {}).items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)


_MONITOR_DONE = {"stages": {"probe": {"status": "done", "outputs": {}}, "report": {"status": "done", "outputs": {}}}}


def _raw_manifest(text: str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        _fake_model(work)
        (work / "run").mkdir()
        (work / "run" / "manifest.json").write_text(text)
    return setup


def _chunk(text: str, name: str = "00000.jsonl") -> Callable[[Path], None]:
    return lambda work: _resume_folder(work, _MONITOR_DONE, files={f"gen-000/.chunks/sample/{name}": text})


def _recorded_output(change: str) -> Callable[[Path], None]:
    """gen-000/sample recorded done with the hash of samples.jsonl; then the file is altered or removed."""
    def setup(work: Path) -> None:
        from selftrain.run.records import sha256_bytes

        text = '{"prompt_id": "x", "response": "hi"}\n'
        stages = {**_MONITOR_DONE["stages"], "sample": {"status": "done", "outputs": {
            "gen-000/samples.jsonl": sha256_bytes(text.encode())}}}
        _resume_folder(work, {"stages": stages}, files={"gen-000/samples.jsonl": text})
        target = work / "run" / "gen-000" / "samples.jsonl"
        if change == "tamper":
            target.write_text(text.replace("hi", "HI"))
        else:
            target.unlink()
    return setup


def _pickle_checkpoint(work: Path) -> None:
    """A real checkpoint whose weights are only a pickle file (pytorch_model.bin)."""
    import torch
    from safetensors.torch import load_file

    from conftest import make_tiny_model

    folder = make_tiny_model(work / "pickle_model")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def C(id, args, *culprit, known=frozenset(), reason="", setup=None, env=(), script="selftrain"):
    return Case(id, tuple([args] if isinstance(args, str) else args), tuple(culprit), frozenset(known),
                reason, setup, tuple(env), script)


def constitution(id, file, *culprit, **kw):
    return C(f"constitution-{id}", f"constitution.path='{file}'", *culprit, **kw)


def prompt_file(id, file, *culprit, **kw):
    return C(f"prompts-{id}", f"prompts.sources=[{{name:x,path:'{file}'}}]", *culprit, **kw)


def probes(id, suite, *culprit, extra=(), **kw):
    return C(f"probes-{id}", (f"probes.suite='{suite}'", *extra), *culprit, **kw)


CORPUS = [
    # ---- configs, refused while Hydra composes (before the job starts)
    C("cfg-unknown-top-key", "foo=1", "'foo'"),
    C("cfg-unknown-nested-key", "sampler.bogus=1", "sampler.bogus"),
    C("cfg-generations-not-int", "generations=abc", "generations=abc"),
    C("cfg-batch-size-float", "sampler.batch_size=1.5", "sampler.batch_size=1.5"),
    C("cfg-memory-budget-zero", "sampler.memory_budget_gib=0", "sampler.memory_budget_gib=0"),
    C("cfg-prefill-rows-zero", "sampler.prefill_rows=0", "sampler.prefill_rows=0"),
    C("cfg-seed-list", "seed=[1]", "seed=[1]"),
    C("cfg-generations-null", "generations=null", "generations"),
    C("cfg-lora-rank-string", "train.lora.r=x", "train.lora.r=x"),
    C("cfg-dimensions-not-list", "probes.dimensions=abc", "probes.dimensions"),
    C("cfg-prompt-source-unknown-field", "prompts.sources=[{name:x,bogus:1}]", "'bogus'"),
    C("cfg-unknown-constitution-option", "constitution=nope", "constitution/nope"),
    C("cfg-unknown-model-option", "model=nope", "model/nope"),
    C("cfg-unknown-experiment-option", "experiment=nope", "nope"),
    C("cfg-append-unknown-top-key", "+foo=1", "foo"),
    # ---- configs, refused by checks.validate (inside the job)
    C("cfg-generations-zero", "generations=0", "generations=0"),
    C("cfg-negative-temperature", "sampler.temperature=-0.5", "sampler.temperature=-0.5"),
    C("cfg-top-p-zero", "sampler.top_p=0", "sampler.top_p=0"),
    C("cfg-sft-unknown-field", "+train.sft.learnin_rate=1e-4", "train.sft.learnin_rate"),
    C("cfg-sft-output-dir", "+train.sft.output_dir=/tmp/elsewhere", "train.sft.output_dir"),
    C("cfg-dtype-int8", "model.dtype=int8", "model.dtype=int8"),
    C("cfg-device-unknown", "model.device=tpu9", "model.device='tpu9'"),
    C("cfg-device-absent-gpu", "model.device=cuda:7", "model.device='cuda:7'"),
    C("cfg-critique-rounds-zero", "critique.rounds=0", "critique.rounds=0"),
    C("cfg-constitution-context-unknown", "constitution.context=whole", "constitution.context=whole"),
    # ---- a monitor that could never alert: 6 items per test over 30 behavioural tests
    C("cfg-monitor-underpowered", "probes.max_items_per_dimension=6", "probes.max_items_per_dimension",
      "monitor.allow_underpowered"),
    C("cfg-monitor-cue-underpowered", ("probes.dimensions=[corrigibility,sycophancy]", "monitor.cue_items=1"),
      "monitor.cue_items"),
    C("cfg-monitor-options-rule", "monitor.options_rule=sometimes", "monitor.options_rule=sometimes"),
    # ---- the data screen and the steering check (#17)
    C("cfg-screen-gate-no-directions", ("monitor.screen=gate", "monitor.activations=false"), "monitor.screen=gate",
      "monitor.activations=false"),
    C("cfg-screen-unknown-mode", "monitor.screen=sometimes", "monitor.screen=sometimes"),
    C("cfg-screen-threshold-out-of-range", "monitor.screen_threshold=-1", "monitor.screen_threshold=-1"),
    C("cfg-screen-row-threshold-out-of-range", "monitor.screen_row_threshold=50", "monitor.screen_row_threshold=50"),
    C("cfg-steer-alphas-empty", "monitor.steer_alphas=[]", "monitor.steer_alphas=[]"),
    C("cfg-steer-alphas-not-finite", "monitor.steer_alphas=[1,nan]", "monitor.steer_alphas="),
    C("cfg-source-path-and-hf", "prompts.sources=[{name:x,path:'<BAD>/prompts/ok.jsonl',hf:org/data}]",
      "prompts.sources[0]", "`path`"),
    C("cfg-source-n-zero", "prompts.sources=[{name:x,path:'<BAD>/prompts/ok.jsonl',n:0}]",
      "prompts.sources[0].n=0"),
    # ---- preference training (train=dpo)
    C("pref-labeller-url-not-http", ("train=dpo", "preferences=ai_feedback", "preferences.labeller_base_url=ftp://x"),
      "preferences.labeller_base_url=ftp://x", "http"),
    C("pref-served-labeller-unreachable",
      ("train=dpo", "preferences=ai_feedback", "preferences.labeller_base_url=http://127.0.0.1:9/v1",
       "sampler.retries=0", "model.name_or_path=embedded:smollm2-135m-instruct"),
      "preferences.labeller_base_url", "127.0.0.1:9"),
    C("pref-min-margin-above-one", ("train=dpo", "preferences=ai_feedback", "preferences.min_margin=1.5"),
      "preferences.min_margin=1.5", "[0, 1]"),
    C("pref-min-margin-negative", ("train=dpo", "preferences=ai_feedback", "preferences.min_margin=-0.2"),
      "preferences.min_margin=-0.2"),
    C("pref-dpo-unknown-field", ("train=dpo", "+train.dpo.bta=0.1"), "train.dpo.bta", "trl.DPOConfig"),
    C("pref-dataset-without-path", ("train=dpo", "preferences.source=dataset"), "preferences.path"),
    C("pref-dataset-missing-field", ("train=dpo", "preferences.source=dataset",
                                     "preferences.path='<BAD>/preferences/missing_rejected.jsonl'"),
      "missing_rejected.jsonl", "line 2", "'rejected'"),
    C("pref-dataset-folder-missing-column", ("train=dpo", "preferences.source=dataset",
                                             "preferences.path='<WORK>/pairs'"),
      "<WORK>/pairs", "'chosen'", setup=_pairs_without_chosen),
    C("pref-labeller-options-same-token", ("train=dpo", "preferences=ai_feedback", "probes.suite='<MINI>'", "monitor.allow_underpowered=true",
                                           "model.name_or_path='<WORK>/tok_model'"),
      "cannot tell options 'A' and 'B' apart", "preferences.options", setup=_tokenizer_only_model),
    # ---- model (a valid probe suite, so that model resolution is reached)
    C("model-missing-folder", ("probes.suite='<MINI>'", "monitor.allow_underpowered=true", "model.name_or_path=./nope/model"), "./nope/model"),
    C("model-folder-without-config", ("probes.suite='<MINI>'", "monitor.allow_underpowered=true", "model.name_or_path='<WORK>/model_no_config'"),
      "model_no_config", "config.json", setup=_model_folder_without_config),
    C("model-embedded-unknown", ("probes.suite='<MINI>'", "monitor.allow_underpowered=true", "model.name_or_path='embedded:unknown'"),
      "embedded:unknown"),
    C("cfg-run-name-escapes-runs", "run_name=../../elsewhere", "run_name=../../elsewhere"),
    # ---- constitution files
    constitution("missing-file", "<BAD>/constitution/does_not_exist.yaml", "does_not_exist.yaml"),
    constitution("yaml-syntax", "<BAD>/constitution/yaml_syntax.yaml", "yaml_syntax.yaml", "line 4"),
    constitution("no-principles", "<BAD>/constitution/no_principles.yaml", "no_principles.yaml", "'principles'"),
    constitution("missing-revision", "<BAD>/constitution/missing_revision.yaml", "missing_revision.yaml",
                 "principles[1]", "'revision'"),
    constitution("duplicate-id", "<BAD>/constitution/duplicate_id.yaml", "duplicate_id.yaml",
                 "duplicate id 'honesty'"),
    constitution("md-no-front-matter", "<BAD>/constitution/no_front_matter.md", "no_front_matter.md",
                 "front matter"),
    constitution("md-heading-without-id", "<BAD>/constitution/heading_without_id.md", "heading_without_id.md",
                 "## Avoiding harm"),
    constitution("md-request-without-section", "<BAD>/constitution/no_section_placeholder.md",
                 "no_section_placeholder.md", "critique_request", "{section}"),
    constitution("fewshot-missing", "<BAD>/constitution/fewshot_missing.yaml", "fewshot_missing.yaml",
                 "does_not_exist.yaml"),
    constitution("fewshot-exemplar-missing-key", "<BAD>/constitution/fewshot_bad_exemplar.yaml",
                 "missing_key.yaml", "exemplars[1]", "'critique'"),
    constitution("context-missing-section", "<BAD>/constitution/context_missing_section.md",
                 "context_missing_section.md", "context_sections", "weighing-conflicts"),
    constitution("not-utf8", "<BAD>/constitution/not_utf8.yaml", "not_utf8.yaml", "UTF-8"),
    constitution("over-1mb", "<WORK>/big.yaml", "big.yaml", "1000000", setup=_big_constitution),
    constitution("is-a-folder", "<BAD>/constitution", "<BAD>/constitution"),
    # ---- prompt files
    prompt_file("missing-file", "<BAD>/prompts/does_not_exist.jsonl", "does_not_exist.jsonl"),
    prompt_file("empty-file", "<BAD>/prompts/empty.jsonl", "prompt set is empty", "empty.jsonl"),
    prompt_file("not-json", "<BAD>/prompts/not_json.jsonl", "not_json.jsonl", "line 3"),
    prompt_file("no-prompt-key", "<BAD>/prompts/no_prompt.jsonl", "no_prompt.jsonl", "line 2", "'prompt'"),
    prompt_file("duplicate-ids", "<BAD>/prompts/duplicate_ids.jsonl", "duplicate_ids.jsonl", "line 3",
                "'p1'"),
    prompt_file("not-utf8", "<BAD>/prompts/not_utf8.jsonl", "not_utf8.jsonl"),
    # needs a tokenizer to know the special tokens: the embedded model's (only its tokenizer loads)
    C("prompts-chat-control-token", ("prompts.sources=[{name:x,path:'<BAD>/prompts/control_token.jsonl'}]",
                                     "model.name_or_path=embedded:smollm2-135m-instruct"),
      "prompt 'forged'", "special token"),
    # ---- probe suites
    probes("missing-path", "<BAD>/probes/no_such_suite", "no_such_suite"),
    probes("malformed-line", "<BAD>/probes/malformed_line", "malformed_line/honesty.jsonl", "line 2"),
    probes("unknown-format", "<BAD>/probes/unknown_format", "unknown_format/honesty.jsonl", "line 2",
           "unknown item format"),
    probes("aligned-answer-maybe", "<BAD>/probes/maybe_answer", "maybe_answer/honesty.jsonl", "line 2",
           "aligned_answer"),
    probes("suite-lists-missing-file", "<BAD>/probes/missing_file", "suite.yaml", "no_such_file.jsonl"),
    probes("empty-folder", "<WORK>/empty_suite", "empty_suite", "no suite.yaml and no .jsonl",
           setup=_mkdir("empty_suite")),
    C("probes-unknown-dimension-default-suite", "probes.dimensions=[nonexistent]", "unknown dimension 'nonexistent'"),
    probes("not-utf8", "<BAD>/probes/not_utf8", "not_utf8/honesty.jsonl"),
    # ---- sampling and training engines
    C("sampler-unknown-backend", "sampler.backend=tgi", "sampler.backend=tgi"),
    C("sampler-openai-no-url", ("sampler=openai", "sampler.base_url=localhost:8000"), "sampler.base_url=localhost:8000"),
    C("sampler-openai-fixed-model-many-generations", ("sampler=openai", "sampler.model=m"), "sampler.model=m",
      "generations"),
    C("sampler-openai-unreachable", ("sampler=openai", "sampler.base_url=http://127.0.0.1:9/v1", "sampler.retries=1",
                                     "sampler.backoff_s=0.1", "probes.suite='<MINI>'", "monitor.allow_underpowered=true",
                                     "model.name_or_path='<WORK>/fake_model'"),
      "sampler.base_url=http://127.0.0.1:9/v1", "unreachable after 2 attempt(s)", setup=_fake_model),
    C("sampler-vllm-tensor-parallel-over-gpus", ("sampler=vllm", "sampler.tensor_parallel_size=64"),
      "sampler.tensor_parallel_size=64", "GPU(s) visible"),
    C("sampler-vllm-memory-fraction", ("sampler=vllm", "sampler.gpu_memory_utilization=1.5"),
      "sampler.gpu_memory_utilization=1.5"),
    C("train-num-processes-zero", "train.num_processes=0", "train.num_processes=0"),
    C("train-accelerate-config-missing", ("train.num_processes=2", "train.accelerate_config='<BAD>/no_such.yaml'"),
      "train.accelerate_config", "no_such.yaml"),
    # ---- resuming a run folder that another config started
    C("resume-other-config", RESUME_ARGS, "manifest.json", "different config", "seed", setup=_resume_literal),
    C("resume-other-seed", RESUME_ARGS, "manifest.json", "differs in: seed)",
      setup=_resume_seed),
    # ---- run folders: resuming, forcing, damaged manifests and chunks, altered outputs
    C("resume-other-chunk-size", RESUME_ARGS, "manifest.json", "differs in: sampler.chunk_size)",
      setup=lambda work: _resume_folder(work, extra=("sampler.chunk_size=5",))),
    C("force-stage-unknown", "force_stage=bogus", "force_stage=bogus", "must be one of"),
    C("force-stage-beyond-generations", "force_stage=gen-005/train", "force_stage=gen-005/train",
      "has no train stage"),
    C("force-stage-malformed", "force_stage=gen-1/train", "force_stage=gen-1/train"),
    C("cfg-chunk-size-zero", "sampler.chunk_size=0", "sampler.chunk_size=0"),
    C("run-manifest-not-json", RESUME_ARGS, "run/manifest.json", "not a valid manifest",
      setup=_raw_manifest('{"config": {"seed": 0},\n')),
    C("run-manifest-not-object", RESUME_ARGS, "run/manifest.json", "expected a JSON object",
      setup=_raw_manifest("[1, 2, 3]\n")),
    C("run-manifest-newer-schema", RESUME_ARGS, "run/manifest.json", "schema_version=99",
      setup=_raw_manifest('{"schema_version": 99, "stages": {}}\n')),
    C("gen-manifest-not-json", RESUME_ARGS, "gen-000/manifest.json", "not a valid manifest",
      setup=lambda work: _resume_folder(work, files={"gen-000/manifest.json": "{{{"})),
    C("chunk-not-json", RESUME_ARGS, ".chunks/sample/00000.jsonl", "damaged",
      setup=_chunk('{"prompt_id": "helpful-000", "respo\n')),
    C("chunk-other-prompts", RESUME_ARGS, ".chunks/sample/00000.jsonl", "prompt ids",
      setup=_chunk('{"prompt_id": "not-one-of-ours", "response": "x"}\n')),
    C("chunk-beyond-last", RESUME_ARGS, ".chunks/sample/00099.jsonl", "beyond",
      setup=_chunk('{"prompt_id": "x"}\n', "00099.jsonl")),
    C("output-changed", RESUME_ARGS, "gen-000/samples.jsonl", "changed since gen-000/sample",
      "force_stage=gen-000/sample", setup=_recorded_output("tamper")),
    C("output-missing", RESUME_ARGS, "gen-000/samples.jsonl", "missing", setup=_recorded_output("remove")),
    # ---- checkpoints
    C("checkpoint-pickle-only", ("probes.suite='<MINI>'", "monitor.allow_underpowered=true", "model.name_or_path='<WORK>/pickle_model'"),
      "pickle_model", "pytorch_model.bin", "allow_pickle", setup=_pickle_checkpoint),
    C("checkpoint-empty-folder", ("probes.suite='<MINI>'", "monitor.allow_underpowered=true", "model.name_or_path='<WORK>/empty_model'"),
      "empty_model", "config.json", setup=_mkdir("empty_model")),
]

# Runs that are not contract cases: HYDRA_FULL_ERROR=1 shows the traceback but still fails.
FULL_ERROR = [
    C("full-error-composition", "foo=1", "foo", env=(("HYDRA_FULL_ERROR", "1"),)),
    C("full-error-job", "generations=0", "generations=0", env=(("HYDRA_FULL_ERROR", "1"),)),
]
# The other console scripts' printers: one bad input each, always a real subprocess.
OTHER_SCRIPTS = [
    C("drift-monitor-options-rule", ("reference=<WORK>/nope", "candidates=[]", "out=<WORK>/out",
                                     "monitor.options_rule=sometimes"),
      "monitor.options_rule=sometimes", script="selftrain-drift"),
    C("validate-monitor-options-rule", ("out=<WORK>/out", "monitor.options_rule=sometimes"),
      "monitor.options_rule=sometimes", script="selftrain-validate"),
    C("compare-too-few-permutations", ("--permutations", "10", "<WORK>"), "--permutations 10",
      script="selftrain-compare"),
    C("lineage-missing-run", "<WORK>/no_such_run", "<WORK>/no_such_run", script="selftrain-lineage"),
]
JOBS = {c.id: c for c in CORPUS + FULL_ERROR + OTHER_SCRIPTS}
assert len(JOBS) == len(CORPUS) + len(FULL_ERROR) + len(OTHER_SCRIPTS), "case ids must be unique"

# Cases that also run as real `selftrain` subprocesses: refused while Hydra composes, refused by
# validate inside the job, refused at model resolution (the tripwire's own path), refused after
# a tokenizer loads (transformers' own logging must stay off stderr), and a refused resume
# (run data byte-identical). With FULL_ERROR's job case and OTHER_SCRIPTS, that is every printer.
CLI_CASES = ("cfg-unknown-top-key", "cfg-generations-zero", "model-missing-folder", "prompts-chat-control-token",
             "resume-other-seed")
assert set(CLI_CASES) <= set(JOBS)


# --------------------------------------------------------------------------- running

@dataclass
class Result:
    case: Case
    work: Path
    argv: list[str]
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    before: dict[str, bytes] = field(default_factory=dict)
    after: dict[str, bytes] = field(default_factory=dict)

    def describe(self) -> str:
        return (f"case {self.case.id}: {' '.join(self.argv[1:])}\n"
                f"exit status {self.rc} after {self.seconds:.1f} s\n"
                f"--- stderr ---\n{self.stderr[-4000:]}--- stdout (tail) ---\n{self.stdout[-1000:]}")


def _fill(text: str, work: Path) -> str:
    return text.replace("<BAD>", str(BAD)).replace("<MINI>", str(MINI)).replace("<WORK>", str(work))


def _snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _argv(case: Case, work: Path) -> list[str]:
    """The command line a user would type for this case."""
    args = [_fill(a, work) for a in case.args]
    if case.script != "selftrain":
        return [str(BIN / case.script), *args]
    return [str(BIN / case.script), f"hydra.run.dir={work / 'run'}", *args, *([TRIPWIRE] if case.tripwire else [])]


def _run(case: Case, work: Path) -> Result:
    run_dir = work / "run"
    argv = _argv(case, work)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **dict(case.env))
    before = _snapshot(run_dir)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=work, env=env, capture_output=True, timeout=TIMEOUT_S)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or b"", (e.stderr or b"") + f"\n[killed after {TIMEOUT_S} s]\n".encode()
    return Result(case, work, argv, rc, out.decode(errors="replace"), err.decode(errors="replace"),
                  time.perf_counter() - t0, before, _snapshot(run_dir))


def _hydra_job(overrides: list[str]):
    """The config Hydra hands the `selftrain` job: composed with its hydra node, which is made
    the current HydraConfig (the job wrapper reads it) and then removed, as Hydra's run_job does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from selftrain.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _in_process(case: Case, work: Path, monkeypatch, capsys) -> Result:
    """Run `case` as the `selftrain` console script would, in this process: the CLI's printer
    around composition and the CLI's job wrapper around the loop. Warnings count as stderr lines."""
    from hydra.core.hydra_config import HydraConfig

    from selftrain import cli
    from selftrain.run.loop import run

    assert case.script == "selftrain", case.id
    run_dir = work / "run"
    argv = _argv(case, work)
    monkeypatch.chdir(work)  # the tripwire and relative paths resolve against the run's folder
    monkeypatch.setattr(sys, "argv", argv)  # the printer names the program after argv[0]
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for k, v in case.env:
        monkeypatch.setenv(k, v)
    job = cli.user_errors_exit(lambda cfg: run(cfg, run_dir))

    def main():
        cfg = _hydra_job(argv[1:])
        try:
            return job(cfg)
        except Exception:  # what Hydra's JobReturn.return_value writes before re-raising a job's error
            sys.stderr.write(f"Error executing job with overrides: {argv[1:]}\n")
            raise

    before = _snapshot(run_dir)
    capsys.readouterr()
    rc, trace = 0, ""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own defaults, as a console script has them
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        try:
            cli.run_and_report(main)
        except SystemExit as e:
            rc = e.code
        except Exception:  # the printer let it through: a traceback, as the console script would show
            rc, trace = 1, "Traceback (most recent call last):\n" + traceback.format_exc()
        finally:
            HydraConfig.instance().cfg = None
    out, err = capsys.readouterr()
    err += trace + "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    return Result(case, work, argv, rc, out, err, time.perf_counter() - t0, before, _snapshot(run_dir))


class Pool:
    """Starts the selected subprocess runs at once (cpu_count at a time); tests collect them in order.
    A run nobody started (under pytest-xdist, see `pool`) starts when its test asks for it."""

    def __init__(self, cases: list[Case], base: Path):
        self.base = base
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
        self.futures: dict[str, concurrent.futures.Future] = {}
        # Cases with a setup start first: the seed case's setup composes today's config, and
        # the sooner its run follows, the less a concurrent edit of conf/ can come between.
        for case in sorted(cases, key=lambda c: c.setup is None):
            self.start(case)

    def start(self, case: Case) -> None:
        work = self.base / case.id
        work.mkdir()
        if case.setup:  # in this thread: setups may compose with Hydra's global state
            try:
                case.setup(work)
            except Exception as e:  # fails this case's tests only
                self.futures[case.id] = concurrent.futures.Future()
                self.futures[case.id].set_exception(e)
                return
        self.futures[case.id] = self.executor.submit(_run, case, work)

    def result(self, case: Case) -> Result:
        if case.id not in self.futures:
            self.start(case)
        return self.futures[case.id].result()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def _wanted_subprocesses(items) -> list[Case]:
    """The subprocess runs the selected tests will ask for."""
    wanted: dict[str, Case] = {}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "originalname", "") == "test_bad_input_is_one_line_exit_2":
            continue  # in process
        for key in ("case", "job"):
            c = params.get(key)
            if isinstance(c, Case) and (c.id in CLI_CASES or c.script != "selftrain" or c.env):
                wanted.setdefault(c.id, c)
    return list(wanted.values())


@pytest.fixture(scope="session")
def pool(request, tmp_path_factory):
    # Every pytest-xdist worker collects every test but runs only its share. Under --dist loadfile
    # (or loadscope) this file's tests all run on the worker that gets here first; otherwise the
    # share is unknown in advance, and each run starts when its test asks for it.
    whole_file = (not os.environ.get("PYTEST_XDIST_WORKER")
                  or request.config.getoption("dist", "no") in ("loadfile", "loadscope"))
    p = Pool(_wanted_subprocesses(request.session.items) if whole_file else [], tmp_path_factory.mktemp("bad-inputs"))
    yield p
    p.close()


@pytest.fixture
def in_process(tmp_path, monkeypatch, capsys):
    """Runs a case in this process (see _in_process) in a fresh working folder."""
    def go(case: Case) -> Result:
        work = tmp_path / case.id
        work.mkdir()
        if case.setup:
            case.setup(work)
        return _in_process(case, work, monkeypatch, capsys)
    return go


# --------------------------------------------------------------------------- checks

_HYDRA_OWN = (".hydra/", "cli.log")  # what Hydra itself writes into a new run folder


def _errors(res: Result) -> list[str]:
    prefix = f"{res.case.script}: error: "
    return [line for line in res.stderr.splitlines() if line.startswith(prefix)]


def breaches(res: Result) -> dict[str, str]:
    """Every way this run breaks the user-error contract, by name."""
    found = {}
    prefix = f"{res.case.script}: error: "
    if res.rc != 2:
        found["exit-status"] = f"exit status {res.rc}, expected 2"
    if "Traceback" in res.stderr:
        found["traceback"] = "stderr holds a traceback"
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = _errors(res)
    if len(errors) != 1:
        found["error-line"] = f"{len(errors)} stderr lines start with {prefix!r}, expected 1"
    else:
        missing = [c for c in (_fill(c, res.work) for c in res.case.culprit) if c not in errors[0]]
        if missing:
            found["culprit"] = f"the error line does not name {missing}"
    others = [line for line in lines if not line.startswith(prefix)]
    if others:
        found["extra-lines"] = f"{len(others)} other non-empty stderr line(s), first: {others[0][:200]!r}"
    changed = sorted(k for k in res.before if res.after.get(k) != res.before[k])
    created = sorted(k for k in res.after if k not in res.before and not k.startswith(_HYDRA_OWN))
    if changed or created:
        found["run-data"] = f"run folder: changed {changed}, created {created}"
    return found


class KnownBreach(AssertionError):
    """Raised when a case breaks the contract in exactly the documented ways (a strict xfail)."""


def _params(cases: list[Case]):
    out = []
    for c in cases:
        marks = [pytest.mark.xfail(raises=KnownBreach, strict=True, reason=c.reason)] if c.known else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def _check(res: Result) -> None:
    found = breaches(res)
    report = "\n".join(f"  {k}: {v}" for k, v in found.items())
    if not found:
        return
    if set(found) == res.case.known:
        raise KnownBreach(f"known breaches:\n{report}\n{res.describe()}")
    raise AssertionError(f"breaches (documented: {sorted(res.case.known) or 'none'}):\n{report}\n{res.describe()}")


@pytest.mark.parametrize("case", _params(CORPUS))
def test_bad_input_is_one_line_exit_2(case: Case, in_process, pool: Pool):
    """`pool` only starts the subprocess runs, on the other cores, while these run in this process."""
    _check(in_process(case))


@pytest.mark.parametrize("case", _params([JOBS[i] for i in CLI_CASES] + OTHER_SCRIPTS))
def test_console_script_prints_one_line_exit_2(case: Case, pool: Pool):
    _check(pool.result(case))


@pytest.mark.parametrize("case", [JOBS[i] for i in CLI_CASES], ids=lambda c: c.id)
def test_in_process_line_is_the_console_scripts_line(case: Case, pool: Pool, in_process):
    """The in-process harness prints what the console script prints (paths of the own working folder aside)."""
    real, here = pool.result(case), in_process(case)
    assert [line.replace(str(real.work), "<WORK>") for line in _errors(real)] == \
        [line.replace(str(here.work), "<WORK>") for line in _errors(here)], f"{real.describe()}\n{here.describe()}"
    assert (real.rc, here.rc) == (2, 2)


@pytest.mark.parametrize("job", [JOBS["resume-other-config"], JOBS["resume-other-seed"]],
                         ids=["other-config", "other-seed"])
def test_refused_resume_leaves_manifests_byte_identical(job: Case, pool: Pool, in_process):
    res = pool.result(job) if job.id in CLI_CASES else in_process(job)
    assert res.rc == 2, res.describe()
    assert res.before.get("manifest.json"), "the setup wrote no manifest"
    for name, data in res.before.items():
        if not name.startswith(".hydra/"):
            assert res.after.get(name) == data, f"{name} changed\n{res.describe()}"
    assert not (res.work / "run" / "gen-001").exists(), res.describe()


def test_full_error_composition_raises(in_process):
    """HYDRA_FULL_ERROR=1 trades the one line for Hydra's traceback; the run must still fail."""
    res = in_process(JOBS["full-error-composition"])
    assert res.rc not in (0, 2, None) and "Traceback" in res.stderr and "foo" in res.stderr, res.describe()
    assert not (res.work / "run" / "manifest.json").exists(), res.describe()


@pytest.mark.parametrize("job", [JOBS["full-error-job"]], ids=lambda c: c.id)
def test_full_error_still_fails(job: Case, pool: Pool):
    """HYDRA_FULL_ERROR=1 trades the one line for Hydra's traceback; the run must still fail."""
    res = pool.result(job)
    assert res.rc not in (0, None), res.describe()
    assert any(c in res.stderr for c in job.culprit), res.describe()
    assert not (res.work / "run" / "manifest.json").exists(), res.describe()


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 45
    assert all(c.culprit for c in CORPUS)
