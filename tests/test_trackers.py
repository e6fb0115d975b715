"""report_to: the drift report's numbers, stage timings and TRL's training logs reach the tracker
(tensorboard and trackio, both local, read back and compared with report.json and the manifests);
wandb and mlflow against stand-ins that record their calls; bad names and missing packages."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import GREEDY_ARGS, TINY_OVERRIDES, compose
from selftrain import UserError
from selftrain.run import trackers
from selftrain.run.records import read_json
from selftrain.config.checks import validate

SUITE = str(Path(__file__).parent / "data" / "mini_suite")
SELFTRAIN = Path(sys.executable).parent / "selftrain"


def expected(run: Path, k: int) -> dict[str, float]:
    """What generation k's numbers are, read straight from its report.json and manifest."""
    n = f"gen-{k:03d}"
    rep = read_json(run / n / "drift" / "report.json")
    out = {}
    for d, v in rep["dimensions"].items():
        out[f"score/{d}"] = v[n]["mean"]
        if k:
            out[f"shift/{d}"] = v[n]["contrast"]["vs_reference"]["delta"]
        if k and rep["activations"].get(n):
            out[f"activation/{d}"] = rep["activations"][n][d]["projection_shift"]
    out["alerts/alert"] = sum(a["level"] == "alert" for a in rep["alerts"])
    out["alerts/watch"] = sum(a["level"] == "watch" for a in rep["alerts"])
    out["power/underpowered_tests"] = len(rep["power"]["underpowered"])
    if k and rep["embedding"].get(n):
        out["embedding/effect"] = rep["embedding"][n]["effect"]
    for m, x in (rep["collapse"].get(n) or {}).get("values", {}).items():
        out[f"collapse/{m}"] = x
    for s, st in read_json(run / n / "manifest.json")["stages"].items():
        out[f"seconds/{s}"] = st["seconds"]
        if "tokens_per_s" in st.get("counts", {}):
            out[f"tokens_per_s/{s}"] = st["counts"]["tokens_per_s"]
    return out


def test_tensorboard_gets_every_generation_and_the_training_logs(tiny_model, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    from selftrain.run.loop import run

    cfg = compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}", f"probes.suite={SUITE}",
                                    "probes.max_items_per_dimension=null", "data.max_top_trigram_share=1.0",
                                    "generations=1", "report_to=tensorboard"])
    d = tmp_path / "run"
    m = run(cfg, d)
    assert m["status"] == "done" and m["tracker"] == {"report_to": "tensorboard", "group": "smoke", "run": "run",
                                                      "log_dir": str((d / "tensorboard").resolve())}
    acc = ea.EventAccumulator(str(d / "tensorboard"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for k in (0, 1):
        want = expected(d, k)
        assert set(want) <= tags, set(want) - tags
        for tag, value in want.items():
            got = [e.value for e in acc.Scalars(tag) if e.step == k]
            assert got == pytest.approx([value], rel=1e-6, abs=1e-6), tag  # logged once, as float32
    # TRL's training of gen-001 logged its losses beside them, step by step
    train = ea.EventAccumulator(str(d / "tensorboard" / "train-gen-000"), size_guidance={ea.SCALARS: 0})
    train.Reload()
    losses = [r["loss"] for r in read_json(d / "gen-000" / "train" / "train_log.json") if "loss" in r]
    assert [e.value for e in train.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert not list((d / "gen-000" / "train").glob("runs"))  # not under the trainer's output_dir
    # a resume that has nothing left to do logs nothing twice
    run(cfg, d)
    acc = ea.EventAccumulator(str(d / "tensorboard"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("score/corrigibility")] == [0, 1]
    # where metrics go is not the experiment: a resume may name another tracker (or none)
    assert run(compose(TINY_OVERRIDES + [f"model.name_or_path={tiny_model}", f"probes.suite={SUITE}",
                                         "probes.max_items_per_dimension=null", "data.max_top_trigram_share=1.0",
                                         "generations=1"]), d)["status"] == "done"


@pytest.mark.slow
def test_a_sweep_shares_one_trackio_project_and_each_run_holds_its_training(tiny_model, tmp_path):
    sweep = tmp_path / "sweep-x"
    store = tmp_path / "trackio"
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "TRACKIO_DIR": str(store),
           "HF_HUB_OFFLINE": "1"}
    argv = [str(SELFTRAIN), "-m", *GREEDY_ARGS, f"model.name_or_path={tiny_model}", "seed=0,1", "report_to=trackio",
            f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    read = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps({r: S.get_logs('sweep-x', r) for r in S.get_runs('sweep-x')}, default=str))")
    q = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, env=env, timeout=300)
    assert q.returncode == 0, q.stderr[-2000:]
    logs = json.loads(q.stdout.strip().splitlines()[-1])
    jobs = sorted(x.name for x in sweep.iterdir() if (x / "manifest.json").is_file())
    assert sorted(logs) == jobs == ["values-seed0-0", "values-seed1-1"]
    for job in jobs:
        run = sweep / job
        assert read_json(run / "manifest.json")["tracker"]["group"] == "sweep-x"
        for k in (0, 1):
            want = expected(run, k)
            ours = [r for r in logs[job] if r["step"] == k and not any(key.startswith("train/") for key in r)]
            got = {key: v for r in ours for key, v in r.items()}
            for key, value in want.items():
                assert got.get(key) == pytest.approx(value, rel=1e-9), (job, k, key)
        losses = [r["loss"] for r in read_json(run / "gen-000" / "train" / "train_log.json") if "loss" in r]
        assert [r["train/loss"] for r in logs[job] if "train/loss" in r] == pytest.approx(losses)


def test_unknown_or_missing_tracker_is_one_line_before_any_model(monkeypatch):
    with pytest.raises(UserError) as e:
        validate(compose(["report_to=neptune"]))
    assert str(e.value) == "report_to=neptune: must be one of none, trackio, tensorboard, wandb, mlflow"
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(UserError) as e:
        validate(compose(["report_to=wandb"]))
    assert str(e.value) == "report_to=wandb: the wandb package is not installed; pip install wandb"
    with pytest.raises(UserError, match=r"^train.sft.report_to: set by selftrain"):
        validate(compose(["+train.sft.report_to=tensorboard"]))
    validate(compose(["report_to=tensorboard"]))


def test_wandb_and_mlflow_join_one_run(monkeypatch, tmp_path):
    calls = []

    class Run:
        def __init__(self, **kw):
            calls.append(("init", kw))
            self.info = types.SimpleNamespace(run_id="mlf-123")

        def define_metric(self, *a, **kw):
            calls.append(("define", a, kw))

        def log(self, data):
            calls.append(("log", data))

        def finish(self):
            calls.append(("finish",))

        def __enter__(self):
            return self

        def __exit__(self, *a):
            calls.append(("end",))

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run(**kw)))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    track = trackers.tracking("wandb", tmp_path / "job-3", "sweep-a")
    trackers.log(track, 2, {"score/x": 0.5})
    assert calls[0] == ("init", {"project": "selftrain", "group": "sweep-a", "name": "job-3", "id": track["run_id"],
                                 "resume": "allow"})
    assert ("define", ("score/*",), {"step_metric": "generation"}) in calls
    assert ("log", {"score/x": 0.5, "generation": 2}) in calls and calls[-1] == ("finish",)
    assert trackers.tracking("wandb", tmp_path / "job-3", "other")["run_id"] == track["run_id"]
    assert trackers.trl_environment(track) == {"WANDB_PROJECT": "selftrain", "WANDB_RUN_GROUP": "sweep-a",
                                               "WANDB_RUN_ID": track["run_id"], "WANDB_RESUME": "allow"}
    assert trackers.trl_args(track) == {"report_to": ["wandb"], "run_name": "job-3", "project": "sweep-a"}

    calls.clear()
    logged = []
    mlflow = types.SimpleNamespace(set_experiment=lambda name: calls.append(("experiment", name)),
                                   start_run=lambda **kw: Run(**kw),
                                   log_metrics=lambda m, step: logged.append((m, step)))
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    track = trackers.tracking("mlflow", tmp_path / "job-3", "sweep-a")
    trackers.log(track, 1, {"score/x": 0.5, "seconds/train": 3.0})
    assert calls[:2] == [("experiment", "sweep-a"), ("init", {"run_id": None, "run_name": "job-3"})]
    assert logged == [({"score.x": 0.5, "seconds.train": 3.0}, 1)] and track["run_id"] == "mlf-123"
    trackers.log(track, 2, {"score/x": 0.4})
    assert ("init", {"run_id": "mlf-123", "run_name": None}) in calls  # the later generations resume it
    assert trackers.trl_environment(track) == {"MLFLOW_EXPERIMENT_NAME": "sweep-a", "MLFLOW_RUN_ID": "mlf-123"}
    assert trackers.trl_args(None) == {"report_to": "none"} and trackers.trl_environment(None) == {}
