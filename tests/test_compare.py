"""selftrain-compare on run folders: one real loop run on the tiny random model (rules arm,
mini suite, one trained generation); the other arms and seeds are copies of its folder with
the manifest's arm / seed edited and, where a test needs a known effect, the final
generation's per-item probe scores shifted on disk (models are not copied: the comparison
never reads them)."""
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from conftest import TINY_OVERRIDES, compose
from selftrain.cli import compare_main
from selftrain.analysis.compare import compare_runs, is_refusal, plan
from selftrain.analysis.stats import load_probe_table
from selftrain.run.records import atomic_dir, read_json, write_json

SUITE = str(Path(__file__).parent / "data" / "mini_suite")
EXE = Path(sys.executable).parent / "selftrain-compare"


@pytest.fixture(scope="module")
def real_run(tiny_model, tmp_path_factory):
    from selftrain.run.loop import run

    cfg = compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}", f"probes.suite={SUITE}",
                                    "probes.max_items_per_dimension=null", "data.max_top_trigram_share=1.0",
                                    "constitution=rules", "generations=1"])
    run_dir = tmp_path_factory.mktemp("real") / "rules-seed0-0"
    assert run(cfg, run_dir)["status"] == "done"
    return run_dir


def clone(src: Path, dst: Path, arm: str | None = None, seed: int | None = None, shift: dict | None = None,
          noise: float = 0.0, run_noise: float = 0.0, **manifest_edits) -> Path:
    """Copy a run folder (without models); edit its arm, seed and manifest fields; add `shift`
    ({dimension: delta}), seeded item noise and seeded run-level noise (one draw per dimension,
    shared by the run's items: what makes training runs differ) to the final generation's scores."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model"))
    m = read_json(dst / "manifest.json")
    if arm:
        m["constitution"]["name"] = arm
        m["config"]["constitution"]["name"] = arm
    if seed is not None:
        m["seeds"]["seed"] = m["config"]["seed"] = seed
    m.update(manifest_edits)  # top-level fields, e.g. status, base_model
    write_json(dst / "manifest.json", m)
    if shift or noise or run_noise:
        final = dst / f"gen-{m['config']['generations']:03d}" / "probes"
        ds = load_from_disk(str(final))
        rng = np.random.default_rng(zlib.crc32(f"{arm}:{seed}".encode()))
        eps = rng.normal(0, noise, len(ds)) if noise else np.zeros(len(ds))
        per_run = {d: rng.normal(0, run_noise) if run_noise else 0.0 for d in sorted(set(ds["dimension"]))}
        rows = [{**r, "score": float(r["score"] + (shift or {}).get(r["dimension"], 0.0) + per_run[r["dimension"]] + e)}
                for r, e in zip(ds, eps)]
        from datasets import Dataset
        with atomic_dir(final) as tmp:
            Dataset.from_list(rows).save_to_disk(str(tmp))
    return dst


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def two_arms(real_run, tmp_path_factory):
    sweep = tmp_path_factory.mktemp("sweep")
    rules = clone(real_run, sweep / "rules-seed0-0")
    values = clone(real_run, sweep / "values-seed0-1", arm="values", shift={"corrigibility": 0.1})
    return sweep, rules, values


def test_one_seed_per_arm_is_inconclusive_and_numbers_come_from_item_scores(two_arms, tmp_path):
    sweep, rules, values = two_arms
    assert compare_main([str(rules), str(values), "--out", str(tmp_path), "--items", "all"]) == 0
    c = read_json(tmp_path / "comparison.json")
    assert c["arms"] == ["values", "rules"]
    (pair,) = c["differences"]
    assert (pair["a"], pair["b"]) == ("values", "rules")
    # the run score is the mean over items read back from disk; with one run per arm, the difference
    # is the mean of per-item differences
    tv, tr = (load_probe_table(r / "gen-001" / "probes")["scores"] for r in (values, rules))
    for d in ("corrigibility", "novel_thing"):
        expect = np.mean([tv[d][i] - tr[d][i] for i in tr[d]])
        assert pair["dimensions"][d]["diff"] == pytest.approx(expect, abs=1e-9)
        assert pair["dimensions"][d]["n_items"] == len(tr[d])
        # two runs: both splits give the same |difference|, so p = 1 whatever the items say
        assert pair["dimensions"][d]["p"] == 1.0 and pair["dimensions"][d]["ci95"] is None
    assert pair["dimensions"]["corrigibility"]["diff"] == pytest.approx(0.1, abs=1e-6)
    v = pair["verdict"]
    assert v["result"] == "inconclusive (design cannot reach alpha)" and v["significant"] == []
    assert "no difference can be called either way" in v["text"]
    # 2 dimensions x 1 pair: 2 x 2/C(2r, r) < 0.05 first at r = 5
    assert c["design"]["seeds_needed_floor"] == 5 and "at least 5 seeds per arm" in v["text"]
    assert c["verdict"]["headline"].startswith("Inconclusive by design")
    assert c["design"]["pairs"][0]["p_floor"] == 1.0 and c["design"]["seed_sd"]["corrigibility"] is None
    assert c["novel"]["dimensions"] == ["novel_thing"] and c["families"]["corrigibility"] == "named"
    for a in ("values", "rules"):
        t = c["training_data"][a]
        assert t["records"] == 8 and 0 <= t["revision_rate"] <= 1 and t["critique_words"] is not None
        assert c["compute"][a]["seconds_total"] > 0
        f, con = c["fairness"][a], read_json(rules / "manifest.json")["constitution"]
        assert f["context_tokens"] == con["context_tokens"] > 0 and f["fewshot_tokens"] == con["fewshot_tokens"] > 0
        assert f["revision_rate"] == t["revision_rate"] and f["context"] == ["section"]
    md = (tmp_path / "comparison.md").read_text()
    assert md.startswith("# Constitution comparison\n\n## Verdict") and "Novel-situation probes" in md
    assert "## Fairness" in md and "## Instruments" in md and "can reach alpha" in md
    page = (tmp_path / "comparison.html").read_text()
    assert "<svg" in page and "<script" not in page


def test_swapping_arm_labels_flips_the_sign(real_run, tmp_path):
    for s in (0, 1):
        clone(real_run, tmp_path / "a" / f"rules-{s}", seed=s, run_noise=0.02)
        clone(real_run, tmp_path / "a" / f"values-{s}", arm="values", seed=s, run_noise=0.02,
              shift={"corrigibility": 0.05})
        clone(tmp_path / "a" / f"rules-{s}", tmp_path / "b" / f"x-{s}", arm="values")
        clone(tmp_path / "a" / f"values-{s}", tmp_path / "b" / f"y-{s}", arm="rules")
    before, after = compare_runs([tmp_path / "a"]), compare_runs([tmp_path / "b"])
    for d, r in before["differences"][0]["dimensions"].items():
        r2 = after["differences"][0]["dimensions"][d]
        assert r2["diff"] == pytest.approx(-r["diff"], abs=1e-12)
        assert r2["ci95"] == pytest.approx([-r["ci95"][1], -r["ci95"][0]], abs=1e-12)
        assert r2["p"] == pytest.approx(r["p"])
    assert before["design"]["seed_sd"]["corrigibility"] > 0 and before["design"]["seed_sd_df"] == 2


def test_run_level_effect_is_detected_when_the_design_can_reach_alpha(real_run, tmp_path):
    # 5 seeds per arm, 2 dimensions: smallest Holm p 2 x 2/C(10, 5) = 0.016 < 0.05
    for s in range(5):
        clone(real_run, tmp_path / f"rules-seed{s}", seed=s, noise=0.01, run_noise=0.01)
        clone(real_run, tmp_path / f"values-seed{s}", arm="values", seed=s, noise=0.01, run_noise=0.01,
              shift={"corrigibility": -0.15})
    c = compare_runs([tmp_path], items="all")
    (pair,) = c["differences"]
    v = pair["verdict"]
    assert v["result"] == "difference" and v["significant"] == ["corrigibility"], v["text"]
    r = pair["dimensions"]["corrigibility"]
    assert r["diff"] == pytest.approx(-0.15, abs=0.03) and r["ci95"][0] < r["diff"] < r["ci95"][1] < 0
    assert r["p"] == pytest.approx(2 / 252) and r["p_holm"] == pytest.approx(4 / 252)
    assert len(r["per_run_a"]) == len(r["per_run_b"]) == 5
    assert not pair["dimensions"]["novel_thing"]["significant"]
    assert c["design"]["pairs"][0]["reachable"] and c["design"]["pairs"][0]["exact"]
    assert c["design"]["seeds_needed"]["corrigibility"] >= 5
    assert c["verdict"]["headline"].startswith("Differences in 1 of 1")


def test_instruments_follow_the_monitor_rule(real_run, tmp_path):
    """Answer-option items count only where gen-000's polarity AUROC reaches monitor.min_option_auroc."""
    def sweep(folder, min_auroc):
        for arm in ("rules", "values"):
            d = clone(real_run, folder / arm, arm=arm)
            m = read_json(d / "manifest.json")
            m["config"]["monitor"]["min_option_auroc"] = min_auroc
            write_json(d / "manifest.json", m)
        return compare_runs([folder])

    strict, lax = sweep(tmp_path / "strict", 1.01), sweep(tmp_path / "lax", 0.0)
    assert strict["instruments"]["used"]["novel_thing"] == ["contrast"]
    assert "polarity AUROC at gen-000" in strict["instruments"]["left_out"]["novel_thing"]
    assert lax["instruments"]["used"]["novel_thing"] == ["contrast", "options"]
    assert "novel_thing" not in lax["instruments"]["left_out"]
    assert strict["instruments"]["items_per_dimension"]["novel_thing"] < \
        lax["instruments"]["items_per_dimension"]["novel_thing"]


def test_fewshot_prompts_must_match_unless_allowed(real_run, tmp_path):
    clone(real_run, tmp_path / "rules")
    v = clone(real_run, tmp_path / "values", arm="values")
    m = read_json(v / "manifest.json")
    m["constitution"]["fewshot_prompts_sha256"] = "0" * 64
    write_json(v / "manifest.json", m)
    _one_line_error(_cli(tmp_path), "few-shot prompts", "'values'", "--allow fewshot_prompts")
    ok = _cli(tmp_path, "--allow", "fewshot_prompts")
    assert ok.returncode == 0, ok.stderr


def test_plan_needs_two_seeds_per_arm(two_arms):
    sweep, _, _ = two_arms
    _one_line_error(_cli(sweep, "--plan"), "--plan needs a pilot with at least 2 seeds per arm", "seed=0,1")


def test_plan_prints_seeds_and_the_sweep(real_run, tmp_path, capsys):
    for s in (0, 1):
        clone(real_run, tmp_path / "pilot" / f"rules-seed{s}", seed=s, run_noise=0.02)
        clone(real_run, tmp_path / "pilot" / f"values-seed{s}", arm="values", seed=s, run_noise=0.02)
    p = plan([tmp_path / "pilot"])
    assert p["seeds_needed"] >= p["seeds_needed_floor"] == 5 and p["tests"] == 2
    for v in p["dimensions"].values():
        assert v["seed_sd_upper80"] > v["seed_sd"] > 0 and v["seeds_needed_upper80"] >= v["seeds_needed"]
    assert p["new_seeds"] == list(range(2, p["seeds_needed"]))
    assert compare_main([str(tmp_path / "pilot"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert f"Seeds per arm needed: {p['seeds_needed']}" in out
    cmd = next(line.strip() for line in out.splitlines() if line.strip().startswith("selftrain -m"))
    assert "constitution=values,rules" in cmd and "seed=" + ",".join(map(str, p["new_seeds"])) in cmd
    assert "experiment=smoke" in cmd and "generations=1" in cmd and f"{tmp_path / 'pilot'}-more" in cmd


def test_sweep_overrides_reproduce_the_config():
    import shlex

    from omegaconf import OmegaConf

    from selftrain.analysis.compare import sweep_overrides
    from selftrain.run.records import flatten

    want = OmegaConf.to_container(compose(TINY_OVERRIDES + ["model.name_or_path='/x/y z'", "generations=1",
                                                            "prompts.sources.0.n=3"]), resolve=True)
    ov, note = sweep_overrides(want)
    assert ov[0] == "experiment=smoke" and not note
    got = OmegaConf.to_container(compose([shlex.split(o)[0] for o in ov]), resolve=True)
    skip = ("constitution", "seed", "run_name")
    assert {k: v for k, v in flatten(got).items() if not k.startswith(skip)} == \
        {k: v for k, v in flatten(want).items() if not k.startswith(skip)}


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selftrain-compare: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_empty_folder_refused(tmp_path):
    _one_line_error(_cli(tmp_path), "no runs found")


def test_incompatible_runs_refused(real_run, tmp_path):
    clone(real_run, tmp_path / "rules")
    clone(real_run, tmp_path / "values", arm="values", base_model="/some/other/model")
    _one_line_error(_cli(tmp_path), "incompatible runs", "base model")


def test_run_in_progress_refused(real_run, tmp_path):
    clone(real_run, tmp_path / "rules")
    clone(real_run, tmp_path / "values", arm="values", status="running")
    _one_line_error(_cli(tmp_path), "still in progress", "values")


def test_differing_config_refused_unless_allowed(real_run, tmp_path):
    clone(real_run, tmp_path / "rules")
    v = clone(real_run, tmp_path / "values", arm="values")
    m = read_json(v / "manifest.json")
    m["config"]["critique"]["critique_max_new_tokens"] += 8
    write_json(v / "manifest.json", m)
    _one_line_error(_cli(tmp_path), "critique.critique_max_new_tokens", "--allow")
    ok = _cli(tmp_path, "--allow", "critique.critique_max_new_tokens")
    assert ok.returncode == 0, ok.stderr
    c = json.loads((tmp_path / "comparison.json").read_text())
    assert list(c["design"]["allowed_differences"]) == ["critique.critique_max_new_tokens"]


def test_different_seeds_per_arm_refused(real_run, tmp_path):
    clone(real_run, tmp_path / "rules")
    clone(real_run, tmp_path / "values", arm="values", seed=1)
    from selftrain import UserError
    with pytest.raises(UserError, match="different seeds"):
        compare_runs([tmp_path])
    assert compare_runs([tmp_path], allow=["seed"])["arms"] == ["values", "rules"]


def test_refusal_detector():
    assert is_refusal("I’m sorry, but I can’t help with that.")
    assert is_refusal("As an AI, I cannot do this.")
    assert not is_refusal("Sure! Here is a recipe for bread.")
    assert not is_refusal("Here is the recipe. " * 10 + "I can't stress enough how good it is.")


def test_joblib_launcher_config_composes():
    from hydra import compose as hcompose, initialize_config_dir

    from selftrain.paths import conf_dir
    from selftrain.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=["hydra/launcher=joblib", "constitution=control"],
                       return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
    from omegaconf import OmegaConf
    assert OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"] == \
        "${constitution.name}-seed${seed}-${hydra.job.num}"
    assert cfg.constitution.name == "control"


def test_html_escapes_arm_names(real_run, tmp_path):
    from selftrain.analysis.compare_render import render_html

    clone(real_run, tmp_path / "a")
    clone(real_run, tmp_path / "b", arm="<script>alert(1)</script>")
    page = render_html(compare_runs([tmp_path]))
    assert "<script" not in page and "&lt;script&gt;" in page
