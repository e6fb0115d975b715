"""selftrain.run.layout: the run folder's names, spelled once."""
from pathlib import Path

from selftrain.run.layout import GenDir, RunDir, gen_dir, gen_dirs, gen_index, gen_name, is_gen_name


def test_generation_names_round_trip():
    for k in (0, 1, 9, 42, 999, 1000):
        assert gen_index(gen_name(k)) == k
    assert gen_name(3) == "gen-003" and gen_dir("runs/x", 12) == Path("runs/x/gen-012")
    assert gen_index("gen-01") is None and gen_index("replaced-gen-001") is None and gen_index("genx") is None
    assert is_gen_name("gen-000") and not is_gen_name("arm-a")


def test_paths_are_the_ones_runs_have_always_written(tmp_path):
    g = GenDir(tmp_path, 1)
    assert g.path == tmp_path / "gen-001" and g.name == "gen-001"
    rel = {name: g.rel(getattr(g, name)) for name in (
        "manifest", "probes", "monitor", "directions", "drift", "report_json", "report_md", "samples",
        "critiques", "preferences", "data", "sft", "preference", "screen", "screen_json", "screen_rows",
        "screen_data", "train", "train_log", "model", "chunks", "child_model")}
    assert rel == {
        "manifest": "gen-001/manifest.json", "probes": "gen-001/probes", "monitor": "gen-001/monitor",
        "directions": "gen-001/monitor/directions", "drift": "gen-001/drift",
        "report_json": "gen-001/drift/report.json", "report_md": "gen-001/drift/report.md",
        "samples": "gen-001/samples.jsonl", "critiques": "gen-001/critiques.jsonl",
        "preferences": "gen-001/preferences.jsonl", "data": "gen-001/data", "sft": "gen-001/data/sft",
        "preference": "gen-001/data/preference", "screen": "gen-001/screen",
        "screen_json": "gen-001/screen/screen.json", "screen_rows": "gen-001/screen/rows.jsonl",
        "screen_data": "gen-001/screen/data", "train": "gen-001/train", "train_log": "gen-001/train/train_log.json",
        "model": "gen-001/model", "chunks": "gen-001/.chunks", "child_model": "gen-002/model"}
    assert g.rel(g.chunk_dir("critique")) == "gen-001/.chunks/critique"
    assert g.train_data("drop") == g.screen_data and g.train_data("gate") == g.data == g.train_data("off")
    assert g.first.path == tmp_path / "gen-000" and g.parent().name == "gen-000"


def test_run_dir_lists_its_generations_in_order(tmp_path):
    for name in ("gen-010", "gen-002", "gen-000", "replaced-x", "gen-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "gen-003").write_text("")  # a file is no generation
    assert [p.name for p in gen_dirs(tmp_path)] == ["gen-000", "gen-002", "gen-010"]
    assert [g.k for g in RunDir(tmp_path).gens()] == [0, 2, 10]
    assert RunDir(tmp_path).manifest == tmp_path / "manifest.json"
    assert GenDir.at(tmp_path / "gen-002").k == 2 and GenDir.at(tmp_path / "reference").k is None
    assert GenDir.at(tmp_path / "reference").samples == tmp_path / "reference" / "samples.jsonl"
