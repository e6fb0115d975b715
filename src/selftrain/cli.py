"""Console scripts: thin Hydra shells around plain functions.

`selftrain` runs the loop (selftrain.loop.run). Errors the user caused print as one line,
`<prog>: error: ...`, and exit with status 2; HYDRA_FULL_ERROR=1 shows the traceback.
SIGINT/SIGTERM exit 130/143 with the command that resumes. In a multirun (-m) a failing job
is reported and the sweep goes on; FailedJobs lists the failures at the end and exits 1.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import hydra._internal.utils as hydra_utils
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from . import UserError
from .paths import conf_dir
from .schema import register

register()
CONF = str(conf_dir())


def _one_line(ex: BaseException) -> str:
    parts = []
    e: BaseException | None = ex
    while e is not None and len(parts) < 3:
        text = " ".join(line.strip() for line in str(e).splitlines()
                        if line.strip() and not line.strip().startswith(("full_key", "object_type",
                                                                         "reference_type")))
        if text and text not in parts:
            parts.append(text)
        e = e.__cause__
    return ": ".join(parts) or type(ex).__name__


def _user_error(ex: BaseException) -> UserError | None:
    e: BaseException | None = ex
    while e is not None:
        if isinstance(e, UserError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _run_and_report(func):
    """Replaces Hydra's error printer: one line for user errors, a traceback for our bugs."""
    try:
        return func()
    except Exception as ex:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        prog = Path(sys.argv[0]).name or "selftrain"
        user = _user_error(ex)
        if user is not None:
            msg = str(user)
        elif isinstance(ex, (HydraException, OmegaConfBaseException)):
            msg = _one_line(ex)
        else:
            raise
        sys.stderr.write(f"{prog}: error: {msg}\n")
        sys.exit(2)


hydra_utils.run_and_report = _run_and_report


def _user_errors_exit(job):
    """Inside a Hydra job, print a user error as one line and exit 2 (Hydra would add a line
    'Error executing job with overrides' before it). Our bugs still raise with a traceback.
    In a multirun, a failing job is reported and returns a failure, so the sweep goes on.
    An interrupt prints how to resume and exits 128 + the signal number."""
    import functools

    @functools.wraps(job)
    def wrapper(cfg):
        prog = Path(sys.argv[0]).name or "selftrain"
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        try:
            return job(cfg)
        except KeyboardInterrupt as e:
            from .resume import resume_command

            key, folder = ("hydra.sweep.dir", hc.sweep.dir) if multirun else ("hydra.run.dir", hc.runtime.output_dir)
            where = getattr(e, "where", None)
            sys.stderr.write(f"{prog}: interrupted ({e or 'KeyboardInterrupt'}"
                             f"{f' at {where}' if where else ''}); finished stages and committed chunks "
                             f"are kept; to resume, run: {resume_command(key, Path(folder).resolve(), sys.argv)}\n")
            sys.exit(getattr(e, "exit_status", 130))
        except Exception as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or not (multirun or isinstance(e, UserError)):
                raise
            if isinstance(e, UserError):
                line = str(e)
            else:
                import traceback

                traceback.print_exc()
                line = f"{type(e).__name__}: {e}"
            if not multirun:
                sys.stderr.write(f"{prog}: error: {line}\n")
                sys.exit(2)
            job_id = f"job {hc.job.num} ({hc.job.override_dirname or 'no overrides'})"
            sys.stderr.write(f"{prog}: error: {job_id}: {line}\n")
            return {"failed": line, "job": job_id, "dir": hc.runtime.output_dir}
    return wrapper


class FailedJobs(Callback):
    """Registered in conf/config.yaml's hydra.callbacks: after a multirun, list the jobs that
    failed (each still wrote its own run folder and manifest) and exit 1 if any did."""

    def __init__(self) -> None:
        self.failed: list[dict] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        value = getattr(job_return, "_return_value", None)
        if isinstance(value, dict) and "failed" in value:
            self.failed.append(value)

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.failed:
            return
        prog = Path(sys.argv[0]).name or "selftrain"
        lines = [f"{prog}: {len(self.failed)} job(s) of the multirun failed; the others ran:"]
        lines += [f"{prog}:   {f['job']} in {f['dir']}: {f['failed']}" for f in self.failed]
        sys.stderr.write("\n".join(lines) + "\n")
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
@_user_errors_exit
def _selftrain(cfg) -> None:
    from .loop import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    manifest = run(cfg, run_dir)
    print(f"selftrain: run finished in {run_dir} ({manifest['status']})\n"
          f"selftrain: drift report: {manifest['final_report']}")


@hydra.main(version_base="1.3", config_path=CONF, config_name="drift")
@_user_errors_exit
def _drift(cfg) -> None:
    import datasets

    from .monitor import monitor_checkpoints
    from .schema import validate_monitor

    datasets.disable_progress_bars()
    validate_monitor(cfg.monitor)
    out = Path(cfg.out)
    report = monitor_checkpoints(cfg, out)
    n_alert = sum(a["level"] == "alert" for a in report["alerts"])
    print(f"selftrain-drift: {n_alert} alert(s), {len(report['alerts']) - n_alert} watch(es)\n"
          f"selftrain-drift: report: {out / 'report.md'}")


@hydra.main(version_base="1.3", config_path=CONF, config_name="validate")
@_user_errors_exit
def _validate(cfg) -> None:
    import datasets

    from .schema import check_trl_fields, validate_monitor
    from .validate import run

    datasets.disable_progress_bars()
    validate_monitor(cfg.monitor)
    check_trl_fields("train.sft", dict(cfg.train.sft), "SFTConfig")
    result = run(cfg, Path(cfg.out))
    r = result["rates"][f"shipped/{cfg.monitor.options_rule}"]
    det, fa = r["detection_standard_dose"], r["false_alarm"]
    print(f"selftrain-validate: detection at the standard dose {det['hits']}/{det['n']}, "
          f"false alarms {fa['hits']}/{fa['n']} (evaluation seeds, shipped thresholds)\n"
          f"selftrain-validate: {Path(cfg.out) / 'validation.html'}")


def main() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    _selftrain()


def validate_main() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _validate()


def drift_main() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    _drift()


def lineage_main(argv: list[str] | None = None) -> int:
    """`selftrain-lineage RUN`: print the chain of generations and verify every recorded hash."""
    import argparse
    import json

    from .lineage import trace

    parser = argparse.ArgumentParser(prog="selftrain-lineage", description=lineage_main.__doc__)
    parser.add_argument("run", help="a run folder (holds manifest.json and gen-*/)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        lin = trace(Path(args.run))
    except UserError as e:
        sys.stderr.write(f"selftrain-lineage: error: {e}\n")
        return 2
    if args.json:
        print(json.dumps(lin.to_dict(), indent=2))
    else:
        print("\n".join(lin.lines))
        for line in lin.mismatches:
            print(line)
    return 1 if lin.mismatches else 0
def compare_main(argv: list[str] | None = None) -> int:
    """`selftrain-compare DIR [DIR ...]`: compare arms (constitutions) across finished runs; reads
    only artifacts on disk (selftrain.compare). `--plan PILOT`: the seeds per arm a powered
    comparison needs, from a pilot sweep's seed-to-seed variation, and the sweep to launch."""
    import argparse

    from .compare import ITEMS, compare_runs, plan, render_plan, write_comparison

    ap = argparse.ArgumentParser(prog="selftrain-compare", description="Compare constitutions across finished "
                                 "runs: a sweep folder (its job folders are the runs) or several run folders.")
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="a sweep folder, or run folders")
    ap.add_argument("--out", help="where comparison.{json,md,html} go (default: DIR, or the common parent "
                    "of several)")
    ap.add_argument("--allow", action="append", default=[], metavar="KEY",
                    help="a config key (or prefix, e.g. train.sft) allowed to differ between runs, or "
                         "fewshot_prompts (arms that show different few-shot prompts); repeatable")
    ap.add_argument("--items", choices=ITEMS, default="informative",
                    help="which probe items' P(aligned) to compare (default: informative: contrast items, and "
                         "answer-option items where the monitor calls them informative)")
    ap.add_argument("--permutations", type=int, default=10000,
                    help="random splits when there are too many to enumerate (default 10000)")
    ap.add_argument("--rng-seed", type=int, default=0, help="seed of the permutation RNG (default 0)")
    ap.add_argument("--plan", action="store_true",
                    help="read a pilot sweep (2+ seeds per arm) and print the seeds per arm a powered "
                         "comparison needs and the sweep command that adds them")
    ap.add_argument("--sweep-dir", help="with --plan: the hydra.sweep.dir of the proposed sweep "
                    "(default: the pilot's folder with '-more')")
    args = ap.parse_args(argv)
    try:
        if args.permutations < 1000:
            raise UserError(f"--permutations {args.permutations}: must be at least 1000")
        dirs = [Path(d) for d in args.dirs]
        if args.plan:
            print(render_plan(plan(dirs, allow=args.allow, items=args.items, sweep_dir=args.sweep_dir)), end="")
            return 0
        out = Path(args.out) if args.out else (dirs[0] if len(dirs) == 1 else
                                               Path(os.path.commonpath([d.resolve() for d in dirs])))
        comp = compare_runs(dirs, allow=args.allow, items=args.items, n_perm=args.permutations,
                            rng_seed=args.rng_seed)
        write_comparison(comp, out)
    except UserError as e:
        sys.stderr.write(f"selftrain-compare: error: {e}\n")
        return 2
    print(f"selftrain-compare: {comp['verdict']['headline']}\n"
          f"selftrain-compare: report: {out / 'comparison.md'} (and comparison.html, comparison.json)")
    return 0
