"""The drift report's stage-timings section is read from the generations' manifests."""
from selftrain.run.layout import MANIFEST, gen_dir
from selftrain.run.records import Manifest
from selftrain.analysis.drift_report import render_markdown, stage_timings


def test_stage_timings_from_manifests(tmp_path):
    m0 = Manifest(gen_dir(tmp_path, 0) / MANIFEST, {"generation": 0})
    with m0.stage("probe") as c:
        c["items"] = 3
    with m0.stage("sample") as c:
        c.update(new_tokens=120, tokens_per_s=40.0)
    m0.update(wall_s=10.0, monitor_fraction=0.1)
    m1 = Manifest(gen_dir(tmp_path, 1) / MANIFEST, {"generation": 1})
    with m1.stage("probe"):
        pass
    t = stage_timings(tmp_path, 1)
    assert set(t) == {"gen-000", "gen-001"}
    assert t["gen-000"]["stages"]["sample"]["new_tokens"] == 120
    assert t["gen-000"]["stages"]["sample"]["tokens_per_s"] == 40.0
    assert "tokens_per_s" not in t["gen-000"]["stages"]["probe"] and t["gen-000"]["monitor_fraction"] == 0.1
    assert set(t["gen-001"]["stages"]) == {"probe"}
    assert stage_timings(tmp_path, 0).keys() == {"gen-000"}
    rep = {"title": "t", "settings": {"alpha": 0.05, "min_effect": 0.03}, "reference": "gen-000",
           "candidates": [], "generations": ["gen-000"], "alert_on": ["gen-000"], "alerts": [], "dimensions": {},
           "activations": {}, "embedding": {}, "collapse": {}, "monitoring_cue_gap": {}, "concealment": {},
           "answer_bias": {}, "stage_timings": t}
    md = render_markdown(rep)
    assert "## Stage timings" in md and "(40.0 tok/s)" in md and "| gen-001 |" in md
