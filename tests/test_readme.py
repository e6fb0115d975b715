"""Every command in the README and docs/ still works as written, as far as a test can run it.

Each line of a ```bash block is taken whole (with `\\` continuations) and checked by what it is:
- `selftrain ...` (runs and `-m` sweeps, every combination of a sweep's values): the config
  composes with those overrides and passes the same checks the console script runs before any
  model loads. Running them to the end is the integration tests' job (the smoke experiment, a
  two-arm sweep, planted drift with the README's `selftrain-drift` lines).
- `selftrain-drift` / `selftrain-validate`: their configs compose and pass their checks.
- `selftrain-compare` / `-lineage` / `-dashboard`: every flag parses; on folders that do not
  exist the script ends with one line naming the folder and exit 2, not a usage error.
- `python -m benchmarks.run ...`: the runner's parser takes every flag (it is stopped there).
- `make TARGET`: the Makefile has the target.
Lines with a placeholder (`...`) and shell set-up (`.`, `cd`, `tensorboard`, ...) are skipped,
and the test counts what it checked so a README without commands cannot pass silently.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from selftrain.paths import conf_dir

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = {".", "source", "cd", "export", "tensorboard", "trackio", "pip", "git"}


def commands(path: Path) -> list[str]:
    out, lang, buf = [], None, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            lang = line[3:].strip() if lang is None else None
            continue
        if lang not in ("bash", "sh"):
            continue
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line, buf = (buf + line).strip(), ""
        if line:
            out.append(line)
    return out


CASES = [(p.relative_to(ROOT), c) for p in DOCS for c in commands(p)]


def sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of a sweep that between them hold every value of every axis (`key=a,b` is an axis,
    as in Hydra's basic sweeper; `[...]` lists are one value): each value with the other axes'
    first values. The checks look at one job's config at a time, so the full product adds nothing."""
    axes = []
    for o in overrides:
        key, _, value = o.partition("=")
        vals = value.split(",") if "," in value and not value.startswith("[") else [value]
        axes.append([f"{key}={v}" for v in vals])
    first = [a[0] for a in axes]
    jobs = [first] + [first[:i] + [v] + first[i + 1:] for i, a in enumerate(axes) for v in a[1:]]
    return jobs


def composed(name: str, overrides: list[str]):
    from selftrain.config.schema import register

    register()  # the console scripts register the structured configs on import
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def check_selftrain(args: list[str]) -> None:
    from selftrain.config.checks import validate

    multirun = "-m" in args or "--multirun" in args
    args = [a for a in args if a not in ("-m", "--multirun")]
    for combo in sweep(args) if multirun else [args]:
        cfg = composed("config", combo)
        cfg = {k: v for k, v in cfg.items() if k != "hydra"}
        from omegaconf import OmegaConf
        validate(OmegaConf.create(cfg))


def check_drift(args: list[str], name: str) -> None:
    from selftrain.config.checks import check_trl_fields, validate_monitor

    cfg = composed(name, args)
    validate_monitor(cfg.monitor)
    if name == "validate":
        check_trl_fields("train.sft", dict(cfg.train.sft), "SFTConfig")


def check_argparse(script: str, args: list[str], capsys) -> None:
    from selftrain import cli

    main = {"selftrain-compare": cli.compare_main, "selftrain-lineage": cli.lineage_main,
            "selftrain-dashboard": cli.dashboard_main}[script]
    folders = [a for a in args if not a.startswith("-")]
    assert main(args) == 2, f"{script} {shlex.join(args)}: no run folders here, so it should refuse"
    err = capsys.readouterr().err
    assert "usage:" not in err, f"{script} does not take these arguments:\n{err}"
    assert len(err.strip().splitlines()) == 1 and any(f in err for f in folders), err


class Parsed(Exception):
    pass


def check_parses(module: str, args: list[str], monkeypatch) -> None:
    """Run an argparse `main(argv)` only as far as its parser: the flags exist and the values parse."""
    import argparse
    import importlib

    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        real(self, argv, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        importlib.import_module(module).main(args)


@pytest.mark.parametrize("doc, line", CASES, ids=[f"{d}:{c[:60]}" for d, c in CASES])
def test_command_works_as_written(doc, line, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the commands' relative run folders must not exist here
    words = shlex.split(line)
    env = [w for w in words if re.fullmatch(r"[A-Z_]+=\S*", w)]
    words = words[len(env):] if words[:len(env)] == env else words
    head, args = words[0], words[1:]
    if head in SKIP or "..." in line:
        pytest.skip(f"{head}: shell set-up or a placeholder, not a selftrain command")
    if head == "make":
        targets = [a for a in args if "=" not in a]
        text = (ROOT / "Makefile").read_text()
        for t in targets:
            assert re.search(rf"^{re.escape(t)}:", text, re.M), f"Makefile has no target {t}"
    elif head == "selftrain":
        check_selftrain(args)
    elif head in ("selftrain-drift", "selftrain-validate"):
        check_drift(args, head.removeprefix("selftrain-"))
    elif head in ("selftrain-compare", "selftrain-lineage", "selftrain-dashboard"):
        check_argparse(head, args, capsys)
    elif head == "python" and args[:2] == ["-m", "benchmarks.run"]:
        monkeypatch.syspath_prepend(str(ROOT))
        check_parses("benchmarks.run", args[2:], monkeypatch)
    else:
        pytest.fail(f"{doc}: `{head}` is not a command this test knows how to check; teach it")


def test_the_docs_hold_commands():
    heads = {shlex.split(c)[0] for _, c in CASES}
    assert {"make", "selftrain", "selftrain-drift", "selftrain-compare"} <= heads
    assert sum(shlex.split(c)[0] == "selftrain" for _, c in CASES) >= 10


def test_a_broken_command_fails(monkeypatch):
    """The checks can fail: an unknown key, a bad value, a flag compare lacks."""
    from selftrain import UserError
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        check_selftrain(["constitution=rulez"])
    with pytest.raises(UserError, match="generations"):
        check_selftrain(["-m", "generations=1,0"])
    monkeypatch.syspath_prepend(str(ROOT))
    with pytest.raises(SystemExit):
        check_parses("benchmarks.run", ["--no-such-flag"], monkeypatch)


def test_the_readme_counts_what_ships():
    """Numbers the README states about shipped data match the data (they drift otherwise)."""
    from selftrain.constitution import Constitution
    from selftrain.monitor.suites import load_suite

    text = " ".join((ROOT / "README.md").read_text().split())
    suite = load_suite("builtin:probes/suites/default")
    assert f"{len(suite.dimensions)} value dimensions, {len(suite.items)} items" in text
    rules = Constitution.load("builtin:constitution/rules.yaml")
    assert f"a list of {len(rules.principles)} standalone principles" in text
