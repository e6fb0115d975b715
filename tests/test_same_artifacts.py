"""benchmarks.same_artifacts: timings and folder paths are set aside, anything else that differs is caught."""
import json

from benchmarks.same_artifacts import main


def _run(root, reply, seconds, drift_note):
    (root / "gen-000" / "drift").mkdir(parents=True)
    (root / "gen-000" / "samples.jsonl").write_text(json.dumps({"response": reply}) + "\n")
    (root / "gen-000" / "drift" / "report.json").write_text(json.dumps({"alerts": [], "run": str(root),
                                                                      "stage_timings": {"s": seconds}}))
    (root / "gen-000" / "drift" / "report.md").write_text(f"took {seconds} s {drift_note}")
    (root / "gen-000" / "manifest.json").write_text(json.dumps({
        "created": f"2026-01-0{seconds}", "stages": {"report": {"seconds": seconds, "counts": {"generate_s": seconds},
                                                                 "outputs": {"gen-000/drift": f"hash-{seconds}"}}}}))


def test_timings_are_set_aside_and_a_changed_reply_is_caught(tmp_path, capsys):
    _run(tmp_path / "a", "same reply", 1, "x")
    _run(tmp_path / "b", "same reply", 2, "y")
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    _run(tmp_path / "c", "another reply", 3, "z")
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "differs: gen-000/samples.jsonl" in capsys.readouterr().out
