"""The run dashboard (index.html), rebuilt from a run folder alone: a real tiny run with every
instrument on, then copies of its folder with planted text, a data screen's flags, a gate and
thousands of transcripts written onto disk."""
import shutil
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk

from conftest import TINY_OVERRIDES, compose
from html_check import Page
from selftrain.cli import dashboard_main
from selftrain.analysis.dashboard import PAGE_ROWS, TRANSCRIPTS_PER_GEN, TRANSCRIPTS_TOTAL, write_dashboard
from selftrain.run.records import read_json, read_jsonl, write_json, write_jsonl

SUITE = str(Path(__file__).parent / "data" / "mini_suite")
PAYLOAD = "<script>alert('x')</script></textarea><img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def run2(tiny_model, tmp_path_factory) -> Path:
    """Two trained generations, every instrument on; shared read-only: copy before changing."""
    from selftrain.run.loop import run

    cfg = compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}", f"probes.suite={SUITE}",
                                    "probes.max_items_per_dimension=null", "data.max_top_trigram_share=1.0"])
    d = tmp_path_factory.mktemp("dash") / "run"
    assert run(cfg, d)["status"] == "done"
    return d


def copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("model"))
    return dst


def page_of(run: Path) -> tuple[str, Page]:
    text = write_dashboard(run).read_text()
    p = Page(text)
    assert not p.errors, p.errors[:5]
    return text, p


def transcripts(p: Page, gen: str) -> list[dict]:
    """The transcript elements of one generation's browser, in page order."""
    out, inside = [], False
    for tag, a in p.elements:
        if tag == "section":
            inside = a.get("id") == f"tx-{gen}"
        elif inside and tag == "details":
            out.append(a)
    return out


def test_dashboard_shows_the_run(run2):
    text, p = page_of(run2)
    assert text.startswith("<!DOCTYPE html>")
    rep = read_json(run2 / "gen-002" / "drift" / "report.json")
    words = p.all_text()
    assert "Status: done" in words
    for gen in ("gen-000", "gen-001", "gen-002"):
        assert f"{gen}/drift/report.html" in text and gen in words
    # every dimension has a trajectory panel (its title is SVG text) and every generation a timing row
    svg = " ".join(p.svg_text)
    for d, v in rep["dimensions"].items():
        assert f"{d} ({v['family']})" in svg
    assert {"generations", "timings", "power", "alerts", "status"} <= p.ids
    m = read_json(run2 / "manifest.json")
    assert m["constitution"]["name"] in words and str(m["prompts"]["count"]) in words
    # the transcript browser: one per generation that revised, every record of these small ones shown
    for gen in ("gen-000", "gen-001"):
        recs = read_jsonl(run2 / gen / "critiques.jsonl")
        rows = transcripts(p, gen)
        assert len(rows) == len(recs)
        assert [r["data-principle"] for r in rows] == [" ".join(rd["principle"] for rd in x["rounds"]) for x in recs]
        kept = set(load_from_disk(str(run2 / gen / "data" / "sft"))["prompt_id"])
        assert [r["data-status"] for r in rows] == ["kept" if x["prompt_id"] in kept else "dropped" for x in recs]
        # the data screen's own rows.jsonl (monitor.screen=report, the default) marks its flagged prompts
        screened = read_jsonl(run2 / gen / "screen" / "rows.jsonl")
        flagged = {r["prompt_id"] for r in screened if r["flagged"]}
        assert [r["data-flagged"] for r in rows] == ["1" if x["prompt_id"] in flagged else "0" for x in recs]
    assert text.count("<b>Data screen</b>") == sum(len(read_jsonl(run2 / g / "critiques.jsonl")) for g in
                                                    ("gen-000", "gen-001"))
    assert "tx-gen-002" not in p.ids  # the last generation is only probed
    assert len(p.scripts) == 1 and f"per={PAGE_ROWS}" in p.scripts[0]


def test_generated_text_is_escaped(run2, tmp_path):
    run = copy(run2, tmp_path / "run")
    crit = run / "gen-000" / "critiques.jsonl"
    rows = read_jsonl(crit)
    rows[0]["prompt"] = "prompt " + PAYLOAD
    rows[0]["rounds"][0]["critique"] = PAYLOAD
    rows[0]["rounds"][0]["principle"] = "p'\"><script>x</script>"
    rows[1]["final"] = PAYLOAD
    write_jsonl(crit, rows)
    m = read_json(run / "manifest.json")
    m["status"], m["gate"] = "gated", {"at": "gen-001", "stopped_before": "gen-002", "reason": "alert: " + PAYLOAD}
    write_json(run / "manifest.json", m)
    text, p = page_of(run)
    assert text.count("<script") == 1 and "</textarea" not in text and "<img" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert PAYLOAD in p.all_text()  # as text, where a reader sees it
    assert "alert: " + PAYLOAD in p.all_text() and "Gate:" in p.all_text()
    assert transcripts(p, "gen-000")[0]["data-principle"] == "p'\"><script>x</script>"


def test_dropped_rows_say_why_and_screen_flags_are_marked(run2, tmp_path):
    run = copy(run2, tmp_path / "run")
    g = run / "gen-000"
    recs = read_jsonl(g / "critiques.jsonl")
    recs[3]["final"] = ""  # the data stage drops an empty revision
    write_jsonl(g / "critiques.jsonl", recs)
    sft = load_from_disk(str(g / "data" / "sft"))
    rows = [r for r in sft if r["prompt_id"] != recs[3]["prompt_id"]]
    shutil.rmtree(g / "data" / "sft")
    Dataset.from_list(rows).save_to_disk(str(g / "data" / "sft"))
    (g / "screen").mkdir(exist_ok=True)
    write_jsonl(g / "screen" / "rows.jsonl", [{"row": 2, "flagged": True, "dimension": "corrigibility",
                                              "projection_difference": 0.4},
                                             {"row": 5, "flagged": False}])
    g1 = read_jsonl(run / "gen-001" / "critiques.jsonl")
    (run / "gen-001" / "screen").mkdir(exist_ok=True)
    write_jsonl(run / "gen-001" / "screen" / "rows.jsonl", [{"row": 0, "prompt_id": g1[6]["prompt_id"], "flagged": True}])
    text, p = page_of(run)
    shown = transcripts(p, "gen-000")
    assert shown[3]["data-status"] == "dropped" and "dropped: empty" in text
    assert [r["data-flagged"] for r in transcripts(p, "gen-001")] == ["1" if i == 6 else "0" for i in range(len(g1))]
    assert [r["data-flagged"] for r in shown] == ["1" if i == 2 else "0" for i in range(len(recs))]
    assert "1 flagged by the screen" in p.all_text() and "projection_difference" in text
    (run / "gen-001" / "screen" / "rows.jsonl").unlink()
    assert all(r["data-flagged"] == "0" for r in transcripts(page_of(run)[1], "gen-001"))  # no screen: nothing marked


def test_thousands_of_transcripts_are_sampled_and_the_page_says_so(run2, tmp_path):
    run = copy(run2, tmp_path / "run")
    rec = read_jsonl(run / "gen-000" / "critiques.jsonl")[0]
    big = [{**rec, "prompt_id": f"p{i}", "prompt": f"prompt {i} " + "x" * 300, "final": "answer " * 60}
           for i in range(5000)]
    write_jsonl(run / "gen-000" / "critiques.jsonl", big)
    (run / "gen-000" / "screen").mkdir(exist_ok=True)
    write_jsonl(run / "gen-000" / "screen" / "rows.jsonl", [{"row": 4321, "flagged": True}])
    text, p = page_of(run)
    shown = transcripts(p, "gen-000")
    assert len(shown) == TRANSCRIPTS_PER_GEN and shown[0]["data-flagged"] == "0"
    assert sum(r["data-flagged"] == "1" for r in shown) == 1  # a flagged row is always among those shown
    assert f"a sample of {TRANSCRIPTS_PER_GEN} (seeded) of 5000 transcripts" in p.all_text()
    assert len(text) < 3_000_000
    assert write_dashboard(run).read_text() == text  # the same sample every time


def test_fifty_generations_stay_within_the_page_budget(run2, tmp_path):
    run = copy(run2, tmp_path / "run")
    rec = read_jsonl(run / "gen-000" / "critiques.jsonl")[0]
    for k in range(3, 50):
        g = run / f"gen-{k:03d}"
        g.mkdir()
        write_json(g / "manifest.json", {"generation": k, "status": "done", "stages": {
            "sample": {"status": "done", "seconds": 1.0 + k, "counts": {"tokens_per_s": 10.0}}}})
        write_jsonl(g / "critiques.jsonl", [{**rec, "prompt_id": f"g{k}-{i}"} for i in range(400)])
    text, p = page_of(run)
    per_gen = TRANSCRIPTS_TOTAL // 49
    assert len(transcripts(p, "gen-049")) == per_gen and len(transcripts(p, "gen-000")) == 8
    assert sum(t == "details" for t, _ in p.elements) <= TRANSCRIPTS_TOTAL
    for k in range(50):
        assert f"<td>gen-{k:03d}</td>" in text
    # generations whose data was never built say so instead of guessing
    assert transcripts(p, "gen-020")[0]["data-status"] == "pending"
    assert len(text) < 8_000_000


def test_rebuilt_from_disk_by_the_command(run2, tmp_path, capsys):
    run = copy(run2, tmp_path / "run")
    (run / "index.html").unlink()
    assert dashboard_main([str(run)]) == 0 and (run / "index.html").is_file()
    assert dashboard_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a selftrain run folder" in err[0]


def test_drift_report_page_parses_with_every_plot(run2):
    text = (run2 / "gen-002" / "drift" / "report.html").read_text()
    p = Page(text)
    assert not p.errors and "script" not in p.tags
    rep = read_json(run2 / "gen-002" / "drift" / "report.json")
    svg = " ".join(p.svg_text)
    for d, v in rep["dimensions"].items():
        assert f"{d} ({v['family']})" in svg  # value panel
        assert d in svg  # activation forest row
    for m in rep["collapse"]["gen-002"]["values"]:
        assert m in svg
    assert "swap-null 95th percentile (noise)" in svg
