"""Every console script's --help names the script itself and says what it does."""
import sys

import pytest

from selftrain import cli

HYDRA_SCRIPTS = [
    ("selftrain", cli.main, "selftrain: constitutional self-training with an external drift monitor."),
    ("selftrain-drift", cli.drift_main, "selftrain-drift: the drift monitor on its own, on any checkpoints."),
    ("selftrain-validate", cli.validate_main,
     "selftrain-validate: how often the drift monitor catches a planted drift, and how often it cries wolf."),
]
ARGPARSE_SCRIPTS = [
    ("selftrain-lineage", cli.lineage_main, "selftrain-lineage: print a run's chain of generations"),
    ("selftrain-compare", cli.compare_main, "selftrain-compare: compare constitutions (arms)"),
    ("selftrain-dashboard", cli.dashboard_main, "selftrain-dashboard: rebuild each run's index.html"),
]


@pytest.mark.parametrize("name,entry,header", HYDRA_SCRIPTS, ids=[s[0] for s in HYDRA_SCRIPTS])
def test_hydra_script_help_names_itself(name, entry, header, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as ex:
        entry()
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(header + "\n")
    assert "is powered by Hydra" not in out and "cli" not in out.split("\n")[0]
    assert "== Config ==" in out


@pytest.mark.parametrize("name,entry,header", ARGPARSE_SCRIPTS, ids=[s[0] for s in ARGPARSE_SCRIPTS])
def test_argparse_script_help_names_itself(name, entry, header, capsys):
    with pytest.raises(SystemExit) as ex:
        entry(["--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name} ")
    assert " ".join(out.split()).count(header) == 1  # the description, one paragraph
