"""Experiment trackers (`report_to`): what the monitor found in each generation goes to the
tracker the user already has open, and TRL's training logs go to the same run.

`report_to` takes TRL's names: trackio, tensorboard, wandb, mlflow, or none (the default).
Per generation, read from its artifacts once they are written (`generation_metrics`: the drift
report; `timing_metrics`: the generation's manifest), at step = the generation number:
score/<dimension> (mean P(aligned)), shift/<dimension> and shift_options/<dimension> (against
gen-000), mde/<dimension> and power/* (what the monitor could detect), activation/<dimension>,
alerts/{alert,watch,improved}, embedding/*, collapse/<metric>, cue_gap/delta, seconds/<stage>,
tokens_per_s/<stage> and time/*.

Where it goes. One tracker run per selftrain run, named after the run folder; the runs of one
multirun sweep share a group named after the sweep folder (trackio: the project; wandb: the
group, in project $WANDB_PROJECT or "selftrain"; mlflow: the experiment). TRL's trainer is given
the same names (`report_to`, `run_name`, `project`, and WANDB_* / MLFLOW_* variables), so its
loss curves land in that run. TensorBoard keeps runs as folders: selftrain's scalars go to
<run>/tensorboard and each generation's training to <run>/tensorboard/train-gen-NNN beside them
(a trainer restarts its step count every generation, and TensorBoard drops points whose step
goes backwards within one folder).

Only `none` needs nothing installed: a named tracker that is missing is refused in one line,
at config validation, before any model loads.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path

from selftrain import UserError
from selftrain.run.layout import GenDir, gen_name
from selftrain.run.records import read_json

TRACKERS = ("none", "trackio", "tensorboard", "wandb", "mlflow")
TB_FOLDER = "tensorboard"
# wandb plots our metrics against `generation`, not its own step counter, which TRL's logs advance
METRIC_GROUPS = ("score", "shift", "shift_options", "mde", "power", "activation", "alerts", "embedding",
                 "collapse", "cue_gap", "seconds", "tokens_per_s", "time")


def check_tracker(name: str) -> None:
    """One line for an unknown tracker name or a tracker whose package is not installed."""
    if name not in TRACKERS:
        raise UserError(f"report_to={name}: must be one of {', '.join(TRACKERS)}")
    if name != "none" and importlib.util.find_spec(name) is None:
        raise UserError(f"report_to={name}: the {name} package is not installed; pip install {name}")


def tracking(report_to: str, run_dir: Path, group: str) -> dict | None:
    """Where this run's metrics go (JSON-serialisable: it travels to training workers), or None."""
    if report_to == "none":
        return None
    run_dir = Path(run_dir).resolve()
    out = {"report_to": report_to, "group": group, "run": run_dir.name}
    if report_to == "tensorboard":
        out["log_dir"] = str(run_dir / TB_FOLDER)
    if report_to == "wandb":  # a stable id, so every generation and its training resume the one run
        out["run_id"] = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
    return out


def for_training(track: dict | None, k: int) -> dict | None:
    """The tracking a generation's trainer gets: the run's, with its own TensorBoard folder."""
    if not track:
        return None
    out = dict(track)
    if track.get("log_dir"):
        out["train_log_dir"] = str(Path(track["log_dir"]) / f"train-{gen_name(k)}")
    return out


# ---------------------------------------------------------------- what is logged

def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def generation_metrics(run_dir: Path, k: int) -> dict[str, float]:
    """The drift report of generation k, as flat scalars (see the module doc for the names)."""
    n = gen_name(k)
    rep = read_json(GenDir(run_dir, k).report_json)
    out: dict[str, float | None] = {}
    mdes = []
    for d, v in rep["dimensions"].items():
        e = v.get(n) or {}
        out[f"score/{d}"] = _num(e.get("mean"))
        for g, key in (("contrast", "shift"), ("options", "shift_options")):
            r = (e.get(g) or {}).get("vs_reference") or {}
            out[f"{key}/{d}"] = _num(r.get("delta"))
            if g == "contrast" and _num(r.get("mde")) is not None:
                out[f"mde/{d}"] = _num(r["mde"])
                mdes.append(r["mde"])
        act = (rep.get("activations", {}).get(n) or {}).get(d) or {}
        out[f"activation/{d}"] = _num(act.get("projection_shift"))
    for level in ("alert", "watch"):
        out[f"alerts/{level}"] = float(sum(a["level"] == level and a["candidate"] == n for a in rep["alerts"]))
    out["alerts/improved"] = float(sum(a["candidate"] == n for a in rep.get("improvements", [])))
    pw = rep.get("power") or {}
    out["power/underpowered_tests"] = float(len(pw.get("underpowered") or []))
    if mdes:
        out["power/mde_median"] = float(sorted(mdes)[len(mdes) // 2])
    emb = rep.get("embedding", {}).get(n) or {}
    for key in ("effect", "effect_null_q95", "p", "mmd2"):
        out[f"embedding/{key}"] = _num(emb.get(key))
    for m, x in ((rep.get("collapse", {}).get(n) or {}).get("values") or {}).items():
        out[f"collapse/{m}"] = _num(x)
    cue = (rep.get("monitoring_cue_gap", {}).get(n) or {}).get("pooled") or {}
    out["cue_gap/delta"] = _num(cue.get("delta"))
    return {key: v for key, v in out.items() if v is not None}


def timing_metrics(run_dir: Path, k: int) -> dict[str, float]:
    """Generation k's stage seconds, sampling tokens/s, wall time and monitor share, from its manifest."""
    m = read_json(GenDir(run_dir, k).manifest)
    out: dict[str, float | None] = {}
    for name, st in (m.get("stages") or {}).items():
        if st.get("status") != "done":
            continue
        out[f"seconds/{name}"] = _num(st.get("seconds"))
        out[f"tokens_per_s/{name}"] = _num((st.get("counts") or {}).get("tokens_per_s"))
    out["time/wall_s"] = _num(m.get("wall_s"))
    out["time/monitor_fraction"] = _num(m.get("monitor_fraction"))
    return {key: v for key, v in out.items() if v is not None}


# ---------------------------------------------------------------- writing

def log(track: dict | None, k: int, metrics: dict[str, float]) -> None:
    """Log `metrics` at step k to the run `track` names: the run is opened (or resumed) and
    closed around each call, so TRL's trainer can open the same run in between."""
    if not track or not metrics:
        return
    name = track["report_to"]
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=track["log_dir"])
        try:
            for key, v in metrics.items():
                writer.add_scalar(key, v, k)
        finally:
            writer.close()
    elif name == "trackio":
        import trackio

        trackio.init(project=track["group"], name=track["run"], group=track["group"], resume="allow",
                     auto_log_cpu=False, auto_log_gpu=False, embed=False)
        try:
            trackio.log(dict(metrics), step=k)
        finally:
            trackio.finish()
    elif name == "wandb":
        import wandb

        run = wandb.init(project=_wandb_project(), group=track["group"], name=track["run"], id=track["run_id"],
                         resume="allow")
        try:
            run.define_metric("generation")
            for g in METRIC_GROUPS:
                run.define_metric(f"{g}/*", step_metric="generation")
            run.log({**metrics, "generation": k})
        finally:
            run.finish()
    elif name == "mlflow":
        import mlflow

        mlflow.set_experiment(track["group"])
        with mlflow.start_run(run_id=track.get("run_id"), run_name=None if track.get("run_id") else track["run"]) as r:
            track["run_id"] = r.info.run_id  # the loop records it, so training and later generations resume it
            mlflow.log_metrics({key.replace("/", "."): v for key, v in metrics.items()}, step=k)


def _wandb_project() -> str:
    import os

    return os.environ.get("WANDB_PROJECT", "selftrain")


# ---------------------------------------------------------------- TRL's side

def trl_args(track: dict | None) -> dict:
    """TrainingArguments fields that send TRL's logs to the run `track` names (none without one)."""
    if not track:
        return {"report_to": "none"}
    return {"report_to": [track["report_to"]], "run_name": track["run"], "project": track["group"]}


def trl_environment(track: dict | None) -> dict[str, str]:
    """Variables transformers' wandb and mlflow callbacks read to join the same run."""
    if not track:
        return {}
    if track["report_to"] == "wandb":
        return {"WANDB_PROJECT": _wandb_project(), "WANDB_RUN_GROUP": track["group"], "WANDB_RUN_ID": track["run_id"],
                "WANDB_RESUME": "allow"}
    if track["report_to"] == "mlflow":
        return {"MLFLOW_EXPERIMENT_NAME": track["group"], **({"MLFLOW_RUN_ID": track["run_id"]}
                                                             if track.get("run_id") else {})}
    return {}


def point_trainer(trainer, track: dict | None) -> None:
    """Send a trainer's TensorBoard logs to this generation's folder of the run (transformers
    otherwise writes them under the trainer's output_dir)."""
    if not track or not track.get("train_log_dir"):
        return
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = track["train_log_dir"]
