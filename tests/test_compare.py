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
from selftrain.compare import compare_runs, is_refusal
from selftrain.drift import load_probe_table
from selftrain.records import atomic_dir, read_json, write_json

SUITE = str(Path(__file__).parent / "data" / "mini_suite")
EXE = Path(sys.executable).parent / "selftrain-compare"


@pytest.fixture(scope="module")
def real_run(tiny_model, tmp_path_factory):
    from selftrain.loop import run

    cfg = compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}", f"probes.suite={SUITE}",
                                    "probes.max_items_per_dimension=null", "data.max_top_trigram_share=1.0",
                                    "constitution=rules", "generations=1"])
    run_dir = tmp_path_factory.mktemp("real") / "rules-seed0-0"
    assert run(cfg, run_dir)["status"] == "done"
    return run_dir


def clone(src: Path, dst: Path, arm: str | None = None, seed: int | None = None, shift: dict | None = None,
          noise: float = 0.0, **manifest_edits) -> Path:
    """Copy a run folder (without models); edit its arm, seed and manifest fields; add `shift`
    ({dimension: delta}) and seeded noise to the final generation's per-item scores."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model"))
    m = read_json(dst / "manifest.json")
    if arm:
        m["constitution"]["name"] = arm
        m["config"]["constitution"]["name"] = arm
    if seed is not None:
        m["seeds"]["seed"] = m["config"]["seed"] = seed
    m.update(manifest_edits)  # top-level fields, e.g. status, base_model
    write_json(dst / "manifest.json", m)
    if shift or noise:
        final = dst / f"gen-{m['config']['generations']:03d}" / "probes"
        ds = load_from_disk(str(final))
        rng = np.random.default_rng(zlib.crc32(f"{arm}:{seed}".encode()))
        eps = rng.normal(0, noise, len(ds)) if noise else np.zeros(len(ds))
        rows = [{**r, "score": float(r["score"] + (shift or {}).get(r["dimension"], 0.0) + e)}
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


def test_both_arms_and_difference_from_item_scores(two_arms, tmp_path):
    sweep, rules, values = two_arms
    assert compare_main([str(rules), str(values), "--out", str(tmp_path)]) == 0
    c = read_json(tmp_path / "comparison.json")
    assert c["arms"] == ["values", "rules"]
    (pair,) = c["differences"]
    assert (pair["a"], pair["b"]) == ("values", "rules")
    # the reported difference is the mean of per-item differences read back from disk
    tv, tr = (load_probe_table(r / "gen-001" / "probes")["scores"] for r in (values, rules))
    for d in ("corrigibility", "novel_thing"):
        expect = np.mean([tv[d][i] - tr[d][i] for i in tr[d]])
        assert pair["dimensions"][d]["diff"] == pytest.approx(expect, abs=1e-9)
        assert pair["dimensions"][d]["n_items"] == len(tr[d])
    assert pair["dimensions"]["corrigibility"]["diff"] == pytest.approx(0.1, abs=1e-6)
    assert pair["dimensions"]["corrigibility"]["p_holm"] < 0.05
    assert pair["dimensions"]["novel_thing"]["p"] == 1.0
    v = pair["verdict"]
    assert v["result"] == "difference" and v["significant"] == ["corrigibility"]
    assert v["strength"] == "anecdotal"  # one seed per arm
    assert c["novel"]["dimensions"] == ["novel_thing"] and c["families"]["corrigibility"] == "named"
    for a in ("values", "rules"):
        t = c["training_data"][a]
        assert t["records"] == 8 and 0 <= t["revision_rate"] <= 1 and t["critique_words"] is not None
        assert c["compute"][a]["seconds_total"] > 0
    md = (tmp_path / "comparison.md").read_text()
    assert md.startswith("# Constitution comparison\n\n## Verdict") and "Novel-situation probes" in md
    page = (tmp_path / "comparison.html").read_text()
    assert "<svg" in page and "<script" not in page


def test_swapping_arm_labels_flips_the_sign(two_arms, tmp_path):
    sweep, rules, values = two_arms
    before = compare_runs([sweep])
    swapped = tmp_path / "swapped"
    clone(rules, swapped / "a", arm="values")
    clone(values, swapped / "b", arm="rules")
    after = compare_runs([swapped])
    for d, r in before["differences"][0]["dimensions"].items():
        r2 = after["differences"][0]["dimensions"][d]
        assert r2["diff"] == pytest.approx(-r["diff"], abs=1e-12)
        assert r2["ci95"] == pytest.approx([-r["ci95"][1], -r["ci95"][0]], abs=1e-12)
        assert r2["p"] == pytest.approx(r["p"])


def test_identical_constitutions_give_no_detectable_difference(real_run, tmp_path):
    # the loop is deterministic for a seed, so an arm whose constitution is a renamed copy of the
    # rules produces the same artifacts; seeds 1 and 2 add seed-to-seed variation to both arms alike
    for s in (0, 1, 2):
        clone(real_run, tmp_path / f"rules-seed{s}", seed=s, noise=0.02 if s else 0.0)
        clone(real_run, tmp_path / f"copy-seed{s}", arm="rules-copy", seed=s, noise=0.02 if s else 0.0)
    for s in (1, 2):  # same noise in both arms: same seed, same constitution text
        src = load_from_disk(str(tmp_path / f"rules-seed{s}" / "gen-001" / "probes"))
        with atomic_dir(tmp_path / f"copy-seed{s}" / "gen-001" / "probes") as tmp:
            src.save_to_disk(str(tmp))
    assert compare_main([str(tmp_path)]) == 0
    c = read_json(tmp_path / "comparison.json")
    assert c["seeds"] == {"rules": [0, 1, 2], "rules-copy": [0, 1, 2]}
    (pair,) = c["differences"]
    assert pair["verdict"]["result"] == "no detectable difference"
    assert c["verdict"]["headline"].startswith("No detectable difference")
    assert "no detectable difference" in (tmp_path / "comparison.md").read_text()
    traj = c["trajectories"]["corrigibility"]["rules"][-1]
    assert traj["n_seeds"] == 3 and traj["ci_basis"] == "seeds"


def test_real_effect_over_three_seeds_is_not_anecdotal(real_run, tmp_path):
    for s in (0, 1, 2):
        clone(real_run, tmp_path / f"rules-seed{s}", seed=s, noise=0.01)
        clone(real_run, tmp_path / f"values-seed{s}", arm="values", seed=s, noise=0.01,
              shift={"corrigibility": -0.15, "novel_thing": -0.15})
    c = compare_runs([tmp_path])
    v = c["differences"][0]["verdict"]
    assert v["result"] == "difference" and set(v["significant"]) == {"corrigibility", "novel_thing"}
    assert v["strength"] in ("moderate", "strong") and v["n_seeds"] == 3
    assert c["differences"][0]["dimensions"]["corrigibility"]["diff"] == pytest.approx(-0.15, abs=0.03)
    assert c["novel"]["pairs"][0]["pooled"]["diff"] < 0


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
    from selftrain.schema import register

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
    from selftrain.compare import render_html

    clone(real_run, tmp_path / "a")
    clone(real_run, tmp_path / "b", arm="<script>alert(1)</script>")
    page = render_html(compare_runs([tmp_path]))
    assert "<script" not in page and "&lt;script&gt;" in page
