"""The whole loop on the tiny random model: folders, datasets, manifests, reports, resume."""
import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES, compose
from selftrain.run.loop import run

SUITE = str(Path(__file__).parent / "data" / "mini_suite")


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    cfg = compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}", f"probes.suite={SUITE}",
                                    "probes.max_items_per_dimension=null",
                                    "data.max_top_trigram_share=1.0"])
    run_dir = tmp_path_factory.mktemp("run")
    return cfg, run_dir, run(cfg, run_dir)


def test_layout(tiny_run):
    cfg, run_dir, manifest = tiny_run
    assert manifest["status"] == "done"
    for k in range(3):
        g = run_dir / f"gen-{k:03d}"
        assert (g / "manifest.json").is_file() and (g / "probes").is_dir()
        assert (g / "drift" / "report.json").is_file() and (g / "drift" / "report.md").is_file()
    for k in (1, 2):
        assert (run_dir / f"gen-{k:03d}" / "model" / "model.safetensors").is_file()
    assert not (run_dir / "gen-000" / "model").exists()  # gen 0 is the base model, not a copy
    assert not (run_dir / "gen-002" / "samples.jsonl").exists()  # the last generation is only probed


def test_datasets_one_row_per_kept_prompt(tiny_run):
    cfg, run_dir, _ = tiny_run
    for k in (0, 1):
        g = run_dir / f"gen-{k:03d}"
        counts = json.loads((g / "manifest.json").read_text())["stages"]["data"]["counts"]
        sft = load_from_disk(str(g / "data" / "sft"))
        pref = load_from_disk(str(g / "data" / "preference"))
        assert len(sft) == len(pref) == counts["kept"]
        assert len(set(sft["prompt_id"])) == len(sft)
        assert counts["kept"] + counts["dropped_empty"] + counts["dropped_degenerate"] + counts["dropped_unchanged"] == 8


def test_critique_rounds_recorded(tiny_run):
    cfg, run_dir, manifest = tiny_run
    recs = [json.loads(line) for line in open(run_dir / "gen-000" / "critiques.jsonl")]
    assert len(recs) == 8
    ids = set(manifest["constitution"]["principles"])
    for r in recs:
        assert len(r["rounds"]) == cfg.critique.rounds
        assert r["rounds"][0]["principle"] in ids
        assert r["final"] == r["rounds"][-1]["revision"]


def test_weights_differ_between_generations(tiny_run):
    _, run_dir, _ = tiny_run
    a = load_file(str(run_dir / "gen-001" / "model" / "model.safetensors"))
    b = load_file(str(run_dir / "gen-002" / "model" / "model.safetensors"))
    assert any(not (a[k] == b[k]).all() for k in a)


def test_manifests(tiny_run):
    cfg, run_dir, manifest = tiny_run
    for key in ("config", "constitution", "prompts", "probe_suite", "seeds", "versions"):
        assert key in manifest
    assert len(manifest["constitution"]["sha256"]) == 64 and len(manifest["prompts"]["sha256"]) == 64
    assert manifest["prompts"]["count"] == 8 and manifest["config"]["seed"] == cfg.seed
    g1 = json.loads((run_dir / "gen-001" / "manifest.json").read_text())
    assert g1["parent"] == manifest["base_model"] and len(g1["model_sha256"]) == 64
    for name in ("probe", "report", "sample", "critique", "data", "train"):
        st = g1["stages"][name]
        assert st["status"] == "done" and st["seconds"] >= 0
    assert 0 < g1["monitor_fraction"] < 1


def test_reports_compare_with_previous_and_gen0(tiny_run):
    _, run_dir, _ = tiny_run
    rep = json.loads((run_dir / "gen-002" / "drift" / "report.json").read_text())
    assert set(rep["dimensions"]) == {"corrigibility", "novel_thing"}
    d = rep["dimensions"]["corrigibility"]
    assert [g for g in ("gen-000", "gen-001", "gen-002") if g in d] == rep["generations"]
    c = d["gen-002"]["contrast"]
    assert c["vs_reference"]["n"] == c["vs_previous"]["n"] == 5 and d["gen-002"]["options"]["n"] == 2
    assert d["gen-000"]["contrast"]["vs_reference"] is None and len(d["gen-001"]["ci95"]) == 2
    assert all(a["level"] in ("watch", "alert") and a["candidate"] == "gen-002" for a in rep["alerts"])
    for inst in ("activations", "embedding", "collapse", "monitoring_cue_gap"):
        assert "gen-002" in rep[inst], inst
    html = (run_dir / "gen-002" / "drift" / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html
    assert (run_dir / "index.html").read_text().count("report.html") == 3


def test_rerun_skips_finished_stages(tiny_run):
    cfg, run_dir, _ = tiny_run
    before = (run_dir / "gen-001" / "manifest.json").read_text()
    stamp = (run_dir / "gen-001" / "model" / "model.safetensors").stat().st_mtime_ns
    run(cfg, run_dir)
    after = json.loads((run_dir / "gen-001" / "manifest.json").read_text())
    assert after["stages"] == json.loads(before)["stages"]
    assert (run_dir / "gen-001" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
