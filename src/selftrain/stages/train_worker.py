"""The train stage's entry (`run_train`): in this process, or under `accelerate launch` as a subprocess.

With `train.num_processes > 1` the stage calls `launch(...)`: it writes a small JSON spec
(the training function's name and arguments), runs

    python -m accelerate.commands.launch --num_processes N --config_file C --main_process_port P \\
        -m selftrain.stages.train_worker SPEC

and reads back the result the main process wrote. The driver stays single-process: it never
joins the process group, and its own memory holds no model while training runs. Every rank
runs the same training function. Under data parallel every rank holds the whole model: ranks
other than 0 write their copy to a scratch folder that is removed afterwards. Under FSDP or
DeepSpeed ZeRO-3 each rank holds a slice: the save gathers the full weights (a collective) and
rank 0 alone writes them (see `selftrain.stages.train`). Either way only rank 0 writes the
next generation.

A worker that fails on a user error prints `selftrain-worker: error: ...` and exits 2; the
launcher turns that, or any other failure, into one line naming the log file.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from selftrain import UserError
from selftrain.paths import resolve
from selftrain.run import seeds, trackers
from selftrain.run.layout import GenDir
from selftrain.run.records import read_json, write_json

DEFAULT_CONFIG = "builtin:conf/accelerate/cpu_multiprocess.yaml"
ERROR_PREFIX = "selftrain-worker: error: "

def run_train(gen: GenDir, cfg, parent: str, tracker: dict | None) -> dict:
    """The train stage: gen-(k+1)/model from `parent` (model k) on the data training reads
    (the screen's copy under screen=drop); work files in gen-k/train."""
    from selftrain.stages.train import train_generation

    args = dict(method=cfg.train.method, parent=parent, data_dir=gen.train_data(cfg.monitor.screen),
                out_model=gen.child_model, train_cfg=cfg.train, model_cfg=cfg.model, seed=seeds.train(cfg.seed, gen.k),
                work_dir=gen.train, tracking=trackers.for_training(tracker, gen.k))
    # above one process, accelerate launch runs it as a subprocess: the driver stays single-process
    if cfg.train.num_processes == 1:
        return train_generation(**args)
    return launch("train_generation", cfg.train.num_processes, cfg.train.accelerate_config, **args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(function: str, num_processes: int, accelerate_config: str | None, work_dir: Path, **kwargs) -> dict:
    """Run `selftrain.stages.train.<function>(**kwargs)` on `num_processes` processes; return its result."""
    from omegaconf import DictConfig, OmegaConf

    config = check_accelerate_config(accelerate_config)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    args = {k: (OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else
                str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}
    spec = {"function": function, "kwargs": {**args, "work_dir": str(work_dir)},
            "result": str(work_dir / "worker_result.json")}
    spec_path = work_dir / "worker_spec.json"
    write_json(spec_path, spec)
    Path(spec["result"]).unlink(missing_ok=True)
    log_path = work_dir / "accelerate.log"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--config_file", str(config), "--main_process_port", str(_free_port()),
           "-m", "selftrain.stages.train_worker", str(spec_path)]
    env = {**os.environ, "ACCELERATE_LOG_LEVEL": os.environ.get("ACCELERATE_LOG_LEVEL", "warning"),
           "SELFTRAIN_ACCELERATE_CONFIG": accelerate_config or DEFAULT_CONFIG}  # named in the ranks' errors
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    for scratch in work_dir.glob("rank-*"):
        shutil.rmtree(scratch, ignore_errors=True)
    if rc != 0 or not Path(spec["result"]).is_file():
        from selftrain.run.interrupts import check_interrupt

        # The ranks died of the signal that is stopping this run (Ctrl-C reaches the whole process
        # group, Slurm signals every process of a job): the stage is interrupted, not failed.
        check_interrupt()
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        mine = [ln[ln.index(ERROR_PREFIX) + len(ERROR_PREFIX):] for ln in lines if ERROR_PREFIX in ln]
        if mine:
            raise UserError(mine[0])
        last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        raise UserError(f"train.num_processes={num_processes}: accelerate launch failed (exit {rc}): "
                        f"{last[:300]} (log: {log_path})")
    return read_json(Path(spec["result"]))


def check_accelerate_config(value: str | None) -> Path:
    """The accelerate config file `train.accelerate_config` names, checked before any process starts."""
    import importlib.util

    import yaml

    key = f"train.accelerate_config={value or DEFAULT_CONFIG}"
    path = resolve(value or DEFAULT_CONFIG, "train.accelerate_config")
    try:
        conf = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{key}: not a readable YAML file: {str(e).splitlines()[0]}") from e
    if not isinstance(conf, dict) or not isinstance(conf.get("distributed_type"), str):
        raise UserError(f"{key}: not an accelerate config (no `distributed_type:`); see conf/accelerate/")
    kind = conf["distributed_type"].upper()
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{key} needs deepspeed: pip install 'selftrain[deepspeed]'")
    if kind == "DEEPSPEED":
        _check_zero3_gathers(key, conf.get("deepspeed_config") or {})
    return path


def _check_zero3_gathers(key: str, ds: dict) -> None:
    """ZeRO-3 must gather 16-bit weights at save (accelerate's get_state_dict refuses otherwise): in the
    accelerate file (`zero3_save_16bit_model`) or in the DeepSpeed JSON it names."""
    if ds.get("deepspeed_config_file"):
        json_path = Path(os.path.expanduser(ds["deepspeed_config_file"])).resolve()  # accelerate: from the cwd
        try:
            zero = json.loads(json_path.read_text()).get("zero_optimization") or {}
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{key}: deepspeed_config_file {json_path}: not a readable JSON object: "
                            f"{str(e).splitlines()[0]}") from e
        stage, gathers, name = zero.get("stage"), zero.get("stage3_gather_16bit_weights_on_model_save"), \
            f"{json_path}: zero_optimization.stage3_gather_16bit_weights_on_model_save"
    else:
        stage, gathers, name = ds.get("zero_stage"), ds.get("zero3_save_16bit_model"), \
            "deepspeed_config.zero3_save_16bit_model"
    if stage == 3 and gathers is not True:
        raise UserError(f"{key}: ZeRO-3 needs {name}: true, or the train stage cannot gather the "
                        "weights to write the next generation")


def worker(spec_path: str) -> None:
    """One rank: run the named training function; rank 0 writes the result."""
    from omegaconf import OmegaConf

    from selftrain.stages import train

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    kw = dict(spec["kwargs"])
    for key in ("train_cfg", "model_cfg"):
        if key in kw:
            kw[key] = OmegaConf.create(kw[key])
    for key in ("data_dir", "out_model", "work_dir"):
        if key in kw:
            kw[key] = Path(kw[key])
    if rank != 0:  # only rank 0 writes the generation (see the module doc)
        scratch = kw["work_dir"] / f"rank-{rank}"
        kw["out_model"], kw["work_dir"] = scratch / "model", scratch
    result = getattr(train, spec["function"])(**kw)
    if rank == 0:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        write_json(Path(spec["result"]), {**result, "num_processes": world})


def main() -> None:
    try:
        worker(sys.argv[1])
    except UserError as e:
        sys.stderr.write(f"{ERROR_PREFIX}{e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
