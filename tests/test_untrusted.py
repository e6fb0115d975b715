"""Untrusted input: model text in reports, pickle checkpoints, names that become folders."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from selftrain import UserError
from selftrain.models import load_model
from selftrain.run.records import read_jsonl, write_jsonl
from selftrain.analysis.dashboard import write_dashboard
from selftrain.analysis.drift_report import generation_report
from selftrain.config.checks import validate
from selftrain.config.schema import monitor_settings

PAYLOAD = "<script>alert('x')</script></textarea><img src=x onerror=alert(1)>"


def test_model_text_is_escaped_in_reports(tiny_run_1gen, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_1gen, run_dir)
    mon = run_dir / "gen-001" / "monitor" / "samples.jsonl"
    rows = read_jsonl(mon)
    rows[0]["response"] = PAYLOAD
    write_jsonl(mon, rows)
    crit = run_dir / "gen-000" / "critiques.jsonl"
    rows = read_jsonl(crit)
    rows[0]["final"] = "revised " + PAYLOAD
    rows[0]["rounds"][-1]["critique"] = PAYLOAD
    write_jsonl(crit, rows)

    rep = generation_report(run_dir, 1, monitor_settings(compose().monitor))
    assert rep["examples"]["monitor_samples"][0]["response"] == PAYLOAD  # the JSON keeps the text as it was
    page = (run_dir / "gen-001" / "drift" / "report.html").read_text()
    md = (run_dir / "gen-001" / "drift" / "report.md").read_text()
    for doc in (page, md):
        assert "<script" not in doc and "</textarea" not in doc and "<img" not in doc
        assert "&lt;script&gt;" in doc and "&lt;/textarea&gt;" in doc
    # the run dashboard shows gen-000's critiques in full: its one script is its own
    index = write_dashboard(run_dir).read_text()
    assert index.count("<script") == 1 and "</textarea" not in index and "<img" not in index
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in index  # the critique, as text
    assert json.loads((run_dir / "gen-001" / "drift" / "report.json").read_text())["examples"]


def test_pickle_checkpoints_refused_unless_opted_in(tiny_model, tmp_path):
    pkl = tmp_path / "pickled"
    shutil.copytree(tiny_model, pkl)
    state = load_file(str(pkl / "model.safetensors"))
    (pkl / "model.safetensors").unlink()
    torch.save(state, pkl / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin.*allow_pickle"):
        load_model(str(pkl))
    model = load_model(str(pkl), allow_pickle=True)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    empty = tmp_path / "empty"
    shutil.copytree(tiny_model, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no \\*.safetensors"):
        load_model(str(empty))


@pytest.mark.parametrize("override", ["run_name=../../etc", "run_name=a/b", "constitution.name=../x",
                                      "run_name=.hidden"])
def test_names_that_become_folders_stay_inside_runs(override):
    with pytest.raises(UserError, match="names a folder inside runs/"):
        validate(compose([override]))
