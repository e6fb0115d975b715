"""Resume, determinism, interrupts, forced stages, output hashes and disk checks (tiny model).

The whole-loop tests here run generation 0 -> 1 with the monitor's extra instruments off, so a
run takes seconds; the SIGKILL test (test_kill_resume.py) drives the real console script.
"""
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES, compose
from selftrain import UserError
from selftrain.run.records import check_disk, read_json, sha256_tree
from selftrain.run.chunks import chunk_params, read_chunk, run_chunks
from selftrain.run.interrupts import Interrupted, check_interrupt, graceful_interrupts
from selftrain.run.resume import parse_force, resume_command
from selftrain.engines.base import SamplingParams
from selftrain.engines.hf import HFSampler
from selftrain.stages.sample import sample_stage

SUITE = str(Path(__file__).parent / "data" / "mini_suite")
FAST = ["generations=1", f"probes.suite={SUITE}", "probes.max_items_per_dimension=null",
        "data.max_top_trigram_share=1.0", "sampler.chunk_size=3", "monitor.activations=false",
        "monitor.embedding=false", "monitor.collapse=false", "monitor.cue_gap=false"]
# Greedy decoding of the random tiny model repeats one newline token (empty text) unless a
# strong repetition penalty pushes it to other tokens.
GREEDY = ["sampler.temperature=0", "sampler.repetition_penalty=5.0"]


def fast_cfg(tiny_model, *extra):
    return compose(TINY_OVERRIDES + FAST + [f"model.name_or_path={tiny_model}", *extra])


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def gen_manifest(run_dir: Path, k: int) -> dict:
    return read_json(run_dir / f"gen-{k:03d}" / "manifest.json")


@pytest.fixture(scope="module")
def greedy_runs(tiny_model, tmp_path_factory):
    """Two uninterrupted greedy runs of the same config and seed, in separate folders."""
    from selftrain.run.loop import run

    cfg = fast_cfg(tiny_model, *GREEDY)
    dirs = [tmp_path_factory.mktemp("greedy-a"), tmp_path_factory.mktemp("greedy-b")]
    for d in dirs:
        run(cfg, d)
    return cfg, dirs


# --------------------------------------------------------------------------- determinism


def test_greedy_runs_write_byte_identical_datasets(greedy_runs):
    _, (a, b) = greedy_runs
    for rel in ("gen-000/samples.jsonl", "gen-000/critiques.jsonl", "gen-000/data"):
        fa, fb = files(a / rel) if (a / rel).is_dir() else {rel: (a / rel).read_bytes()}, \
            files(b / rel) if (b / rel).is_dir() else {rel: (b / rel).read_bytes()}
        assert fa and fa == fb, rel
    assert {"sft/state.json", "sft/data-00000-of-00001.arrow", "preference/state.json"} <= set(files(a / "gen-000/data"))
    # the trained model too: same data, seed and CPU give the same weights
    assert sha256_tree(a / "gen-001/model") == sha256_tree(b / "gen-001/model")


@pytest.fixture(scope="module")
def sampler(tiny_model):
    from selftrain.models import load_model, load_tokenizer

    return HFSampler(load_model(str(tiny_model)), load_tokenizer(str(tiny_model)), batch_size=2)


def _prompts():
    from selftrain.prompts import Prompt

    texts = ["Hi", "Tell me about dragons", "2+2?", "What is the capital of France?", "Explain rain", "ok", "Why?"]
    return [Prompt(id=f"p{i}", text=t, source="t", category="c") for i, t in enumerate(texts)]


def test_sampling_same_seed_same_records_and_resume_changes_nothing(sampler, tmp_path):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5)
    a = sample_stage(sampler, _prompts(), params, tmp_path / "a", chunk_size=3)
    b = sample_stage(sampler, _prompts(), params, tmp_path / "b", chunk_size=3)
    c = sample_stage(sampler, _prompts(), SamplingParams(max_new_tokens=8, temperature=1.0, seed=6),
                     tmp_path / "c", chunk_size=3)
    assert a == b and a != c
    # an attempt that stopped after chunk 0: the resumed stage samples chunks 1-2 only, same text
    for p in sorted((tmp_path / "a").iterdir())[1:]:
        p.unlink()
    counts = {}
    assert sample_stage(sampler, _prompts(), params, tmp_path / "a", chunk_size=3, counts=counts) == a
    assert counts == {"chunks": 3, "chunks_resumed": 1}


# --------------------------------------------------------------------------- chunks


def test_chunks_fixed_boundaries_and_read_back(tmp_path):
    items = list(range(7))
    ids = [f"p{i}" for i in items]
    calls = []

    def work(i, part):
        calls.append(i)
        if len(calls) == 3 and not (tmp_path / "stop").exists():
            (tmp_path / "stop").write_text("")
            raise KeyboardInterrupt  # killed while chunk 2 was in flight
        return [{"prompt_id": f"p{x}", "value": x * 10 + i} for x in part]

    with pytest.raises(KeyboardInterrupt):
        run_chunks(tmp_path / "c", items, ids, 3, work, {})
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["00000.jsonl", "00001.jsonl"]
    counts = {}
    out = run_chunks(tmp_path / "c", items, ids, 3, work, counts)
    assert calls == [0, 1, 2, 2] and counts == {"chunks": 3, "chunks_resumed": 2}
    assert [r["prompt_id"] for r in out] == ids and [r["value"] for r in out] == [0, 10, 20, 31, 41, 51, 62]


def test_damaged_chunk_is_a_user_error(tmp_path):
    p = tmp_path / "00000.jsonl"
    p.write_text('{"prompt_id": "a"}\n{"prompt_id": ')
    with pytest.raises(UserError, match="00000.jsonl: committed chunk is damaged"):
        read_chunk(p, ["a", "b"])
    p.write_text('{"prompt_id": "a"}\n{"prompt_id": "c"}\n')
    with pytest.raises(UserError, match="prompt ids"):
        read_chunk(p, ["a", "b"])


def test_chunk_seeds_depend_on_index_only():
    p = SamplingParams(seed=7)
    assert chunk_params(p, 3) == chunk_params(p, 3) and chunk_params(p, 3).seed != chunk_params(p, 4).seed
    assert chunk_params(SamplingParams(seed=8), 0).seed not in {chunk_params(p, i).seed for i in range(1000)}


# --------------------------------------------------------------------------- signals


def test_first_signal_sets_a_flag_second_stops_at_once():
    with graceful_interrupts():
        check_interrupt()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        with pytest.raises(Interrupted) as e:
            check_interrupt()
        assert e.value.exit_status == 143
        with pytest.raises(Interrupted) as e2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        assert e2.value.immediate
    check_interrupt()  # the flag is cleared on the way out


def test_resume_command_drops_force_and_resume():
    cmd = resume_command("hydra.run.dir", Path("/r/x"),
                         ["/v/bin/selftrain", "seed=1", "force_stage=train", "resume=false", "hydra.run.dir=/old"])
    assert cmd == "selftrain seed=1 hydra.run.dir=/r/x"


@pytest.mark.slow
def test_sigterm_finishes_the_chunk_then_resume_equals_uninterrupted(tiny_model, greedy_runs, tmp_path):
    """SIGTERM in the middle of critique: the chunk in flight is committed, the stage and the run
    are marked interrupted; a resume samples only the rest and equals an uninterrupted run."""
    from selftrain.run.loop import run

    cfg, (a, _) = greedy_runs
    first = tmp_path / "gen-000" / ".chunks" / "critique" / "00000.jsonl"

    def watch():
        while not first.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    with pytest.raises(Interrupted) as e:
        run(cfg, tmp_path)
    assert e.value.where == "gen-000/critique"
    g0 = gen_manifest(tmp_path, 0)
    assert g0["stages"]["critique"]["status"] == "interrupted"
    assert read_json(tmp_path / "manifest.json")["status"] == "interrupted"
    committed = len(list(first.parent.glob("0*.jsonl")))
    assert 1 <= committed < 3
    run(cfg, tmp_path)
    assert gen_manifest(tmp_path, 0)["stages"]["critique"]["counts"]["chunks_resumed"] == committed
    assert files(tmp_path / "gen-000" / "data") == files(a / "gen-000" / "data")
    assert (tmp_path / "gen-000" / "critiques.jsonl").read_bytes() == (a / "gen-000" / "critiques.jsonl").read_bytes()
    assert not (tmp_path / "gen-000" / ".chunks").exists()


# --------------------------------------------------------------------------- manifests


def test_outputs_hashes_and_lineage(greedy_runs):
    _, (a, _) = greedy_runs
    expected = {"probe": {"gen-000/probes"}, "report": {"gen-000/drift"}, "sample": {"gen-000/samples.jsonl"},
                "critique": {"gen-000/critiques.jsonl"}, "data": {"gen-000/data/sft", "gen-000/data/preference"},
                "guard": set(), "train": {"gen-001/model", "gen-000/train/train_log.json"}}
    if (a / "gen-000" / "monitor").exists():  # the monitor's own files (architecture, instruments)
        expected["probe"].add("gen-000/monitor")
    g0, g1 = gen_manifest(a, 0), gen_manifest(a, 1)
    for name, rels in expected.items():
        outputs = g0["stages"][name]["outputs"]
        assert set(outputs) == rels, name
        for rel, digest in outputs.items():
            assert digest == sha256_tree(a / rel), rel
    assert g1["model_sha256"] == g0["stages"]["train"]["outputs"]["gen-001/model"]
    assert g1["parent_model_sha256"] == g0["model_sha256"] and len(g0["model_sha256"]) == 64
    assert g1["data_sha256"] == g0["stages"]["data"]["outputs"]["gen-000/data/sft"] and g1["data"] == "gen-000/data/sft"
    assert g0["parent_model_sha256"] is None and g0["data_sha256"] is None
    assert set(g1["stages"]) == {"probe", "report"}


def test_tampered_output_refused_before_anything_is_written(greedy_runs, tmp_path):
    from selftrain.run.loop import run

    cfg, (a, _) = greedy_runs
    shutil.copytree(a, tmp_path / "run")
    with open(tmp_path / "run" / "gen-000" / "samples.jsonl", "a") as f:
        f.write('{"prompt_id": "extra"}\n')
    before = files(tmp_path / "run")
    with pytest.raises(UserError, match=r"samples.jsonl: changed since gen-000/sample wrote it.*force_stage=gen-000/sample"):
        run(cfg, tmp_path / "run")
    assert files(tmp_path / "run") == before


def test_force_stage_train_redoes_train_and_later_generations(greedy_runs, tmp_path):
    from selftrain.run.loop import run

    cfg, (a, _) = greedy_runs
    d = tmp_path / "run"
    shutil.copytree(a, d)
    old0 = gen_manifest(d, 0)
    run(fast_cfg(cfg.model.name_or_path, *GREEDY, "force_stage=train"), d)
    new0, new1 = gen_manifest(d, 0), gen_manifest(d, 1)
    for name in ("probe", "report", "sample", "critique", "data", "guard"):
        assert new0["stages"][name] == old0["stages"][name], name  # not redone
    assert new0["stages"]["train"]["started"] >= old0["stages"]["train"]["started"]
    new_model = new0["stages"]["train"]["outputs"]["gen-001/model"]
    assert new_model == old0["stages"]["train"]["outputs"]["gen-001/model"]  # deterministic training
    replaced = list(d.glob("replaced-*"))
    assert len(replaced) == 1 and (replaced[0] / "gen-001" / "model" / "model.safetensors").is_file()
    assert (replaced[0] / "gen-000" / "train" / "train_log.json").is_file()
    assert new1["stages"]["probe"]["status"] == "done" and read_json(d / "manifest.json")["status"] == "done"
    # the same command again is a plain resume: force_stage is not a config change, nothing is redone
    run(fast_cfg(cfg.model.name_or_path, *GREEDY), d)
    assert gen_manifest(d, 0)["stages"] == new0["stages"] and len(list(d.glob("replaced-*"))) == 1


def test_resume_false_moves_earlier_outputs_aside(greedy_runs, tmp_path):
    from selftrain.run.loop import run

    cfg, (a, _) = greedy_runs
    d = tmp_path / "run"
    shutil.copytree(a, d)
    old = files(d)
    run(fast_cfg(cfg.model.name_or_path, *GREEDY, "resume=false", "seed=1"), d)  # a new config is fine
    replaced = list(d.glob("replaced-*"))
    assert len(replaced) == 1 and files(replaced[0]) == old
    assert read_json(d / "manifest.json")["config"]["seed"] == 1


def test_parse_force():
    assert parse_force(None, 2) is None
    assert parse_force("train", 2) == (None, "train")
    assert parse_force("gen-002/probe", 2) == (2, "probe")
    for bad, msg in (("bogus", "must be one of"), ("gen-002/train", "has no train stage"), ("gen-1/train", "must be")):
        with pytest.raises(UserError, match=msg):
            parse_force(bad, 2)


# --------------------------------------------------------------------------- disk space


def _small_disk(free: int):
    def usage(path):
        return shutil._ntuple_diskusage(10**12, 10**12 - free, free)
    return usage


def test_disk_check_names_bytes_needed_and_free(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "disk_usage", _small_disk(1000))
    check_disk(tmp_path / "not" / "yet", 999, "x")
    with pytest.raises(UserError, match=r"not enough disk space for the thing: 5000 bytes needed .*1000 bytes free"):
        check_disk(tmp_path / "not" / "yet", 5000, "the thing")


def test_train_refuses_to_save_a_checkpoint_that_does_not_fit(monkeypatch, tiny_model, tmp_path):
    from datasets import Dataset

    from selftrain.models import load_model
    from selftrain.stages.train import checkpoint_bytes, train_sft

    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer number {i}."}]} for i in range(4)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "sft"))
    need = checkpoint_bytes(load_model(str(tiny_model)))
    cfg = fast_cfg(tiny_model)
    monkeypatch.setattr(shutil, "disk_usage", _small_disk(need - 1))
    with pytest.raises(UserError, match=rf"{need} bytes needed .* {need - 1} bytes free"):
        train_sft(str(tiny_model), tmp_path / "sft", tmp_path / "out" / "model", cfg.train, cfg.model, seed=0,
                  work_dir=tmp_path / "work")
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / ".model.tmp").exists()


def test_interrupt_during_training_saves_no_checkpoint(tiny_model, tmp_path):
    """A signal during training stops after the current step; nothing is saved, so a resume
    trains again from the parent model."""
    from datasets import Dataset

    from selftrain.stages.train import train_sft

    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer number {i}."}]} for i in range(4)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "sft"))
    cfg = fast_cfg(tiny_model, "train.sft.per_device_train_batch_size=1")
    with graceful_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        with pytest.raises(Interrupted) as e:
            train_sft(str(tiny_model), tmp_path / "sft", tmp_path / "out" / "model", cfg.train, cfg.model, seed=0,
                      work_dir=tmp_path / "work")
    assert e.value.exit_status == 130
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / ".model.tmp").exists()
    assert not (tmp_path / "work" / "train_log.json").exists()
