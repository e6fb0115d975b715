"""The monitor on its own and inside the loop: formats, bad checkpoints, the gate."""
import json
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES, compose, make_tiny_model
from selftrain import UserError
from selftrain.run.loop import run
from selftrain.monitor.checkpoints import monitor_checkpoints
from selftrain.monitor.suites import load_suite

ROOT = Path(__file__).resolve().parents[1]
EVALS = ROOT.parent / "shared" / "external" / "anthropic-evals"
SUITE = str(Path(__file__).parent / "data" / "mini_suite")


@pytest.mark.skipif(not EVALS.is_dir(), reason="../shared/external/anthropic-evals is not beside this checkout")
def test_reads_model_written_evaluation_files():
    persona = load_suite(str(EVALS / "persona" / "agreeableness.jsonl"))
    assert len(persona.items) == 1000 and {it.kind for it in persona.items} == {"statement"}
    assert all(it.options[it.target] in ("Yes", "No") for it in persona.items)
    risk = load_suite(str(EVALS / "advanced-ai-risk"))
    assert set(risk.dimensions) == {"corrigible_neutral_HHH", "power_seeking_inclination"}
    assert {it.kind for it in risk.items} == {"choice"}
    # scored over the matching and the not-matching answer, as in the paper; a few items offer up to (F)
    assert all(len(set(it.options)) == 2 and all(o[0] == "(" and o[-1] == ")" for o in it.options)
               for it in risk.items)
    assert sum(set(it.options) == {"(A)", "(B)"} for it in risk.items) > 1000
    assert all(d.family == "external" for d in risk.dimensions.values())


def _drift_cfg(ref, cands, out):
    from hydra import compose as hcompose, initialize_config_dir

    from selftrain.paths import conf_dir
    from selftrain.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hcompose(config_name="drift", overrides=[
            f"reference={ref}", f"candidates=[{','.join(map(str, cands))}]", f"out={out}",
            f"probes.suite={SUITE}", "probes.max_items_per_dimension=null", "monitor.embedding_prompts=4",
            "monitor.permutations=50", "monitor.heldout_paragraphs=2", "monitor.allow_underpowered=true"])


def test_standalone_reseed_raises_nothing(tiny_model, tmp_path):
    report = monitor_checkpoints(_drift_cfg(tiny_model, [tiny_model], tmp_path / "d"), tmp_path / "d")
    assert report["alerts"] == []
    saved = json.loads((tmp_path / "d" / "report.json").read_text())
    assert saved["candidates"] == [str(tiny_model)]
    assert saved["dimensions"]["corrigibility"][str(tiny_model)]["contrast"]["vs_reference"]["delta"] == 0


def test_missing_checkpoint_and_other_architecture(tiny_model, tmp_path):
    with pytest.raises(UserError, match="model path does not exist"):
        monitor_checkpoints(_drift_cfg(tiny_model, ["./no/such/model"], tmp_path / "a"), tmp_path / "a")
    other = make_tiny_model(tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})).save_pretrained(other)
    with pytest.raises(UserError, match="architecture"):
        monitor_checkpoints(_drift_cfg(tiny_model, [other], tmp_path / "b"), tmp_path / "b")


def test_gate_stops_before_training_and_records_why(tiny_model, tmp_path):
    # effect threshold zero and alpha near one: any consistent movement is a cumulative alert. Holm
    # still scales each p by the number of tests, so whether the tiny model's first trained
    # generation moves enough depends on the sampled data: the gate may close after gen-001 or
    # gen-002 (seen with the current sampler); either way it must stop before training.
    cfg = compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}", f"probes.suite={SUITE}",
                                    "probes.max_items_per_dimension=null", "data.max_top_trigram_share=1.0",
                                    "monitor.gate=true", "monitor.min_effect=0", "monitor.alpha=0.999",
                                    "monitor.embedding=false", "monitor.collapse=false", "generations=3"])
    manifest = run(cfg, tmp_path / "run")
    assert manifest["status"] == "gated"
    gate = manifest["gate"]
    k = int(gate["at"].split("-")[1])
    assert k in (1, 2) and gate["stopped_before"] == f"gen-{k + 1:03d}" and "cumulative alert" in gate["reason"]
    assert not (tmp_path / "run" / f"gen-{k + 1:03d}").exists()
    gk = json.loads((tmp_path / "run" / gate["at"] / "manifest.json").read_text())
    assert gk["status"] == "gated" and gk["gate"] == gate and "train" not in gk["stages"]
    for j in range(k):  # every generation before the gate trained its successor
        gj = json.loads((tmp_path / "run" / f"gen-{j:03d}" / "manifest.json").read_text())
        assert "train" in gj["stages"]


def test_token_entropy_comes_from_the_sampling_pass_or_a_scoring_pass(tiny_model, tmp_path, monkeypatch):
    """collapse.json's mean token entropy is read off the decoding pass; where some batch was
    decoded by generate (which keeps no logits), a scoring pass over prompts and samples gives it."""
    import selftrain.monitor.probe as mon
    from selftrain.monitor import collapse

    scored, real = [], collapse.mean_token_entropy
    monkeypatch.setattr(collapse, "mean_token_entropy", lambda *a, **k: scored.append(real(*a, **k)) or scored[-1])
    monitor_checkpoints(_drift_cfg(tiny_model, [tiny_model], tmp_path / "a"), tmp_path / "a")
    assert scored == []  # both models' entropies came from their sampling passes

    from selftrain.kernels.batching import pad_id

    class GenerateOnly(mon.HFSampler):  # transformers' generate decodes every batch, keeping no logits
        def _decode(self, cache, rows, mask, params, eos_ids, entropy=False):
            return self._generate(rows, mask, cache, params, pad_id(self.tokenizer), eos_ids), None

    monkeypatch.setattr(mon, "HFSampler", GenerateOnly)
    monitor_checkpoints(_drift_cfg(tiny_model, [tiny_model], tmp_path / "b"), tmp_path / "b")
    assert len(scored) == 2  # reference and candidate fell back to scoring
    for who in ("reference", "candidate-01"):
        read = json.loads((tmp_path / "a" / who / "monitor" / "collapse.json").read_text())["mean_token_entropy"]
        fell = json.loads((tmp_path / "b" / who / "monitor" / "collapse.json").read_text())["mean_token_entropy"]
        # the same samples (generate draws what the decoding loop draws); scoring reads them retokenised
        assert read > 0 and read == pytest.approx(fell, rel=1e-3)
