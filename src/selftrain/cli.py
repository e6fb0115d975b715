"""Console scripts: thin Hydra shells around plain functions.

`selftrain` runs the loop (selftrain.run.loop.run). Errors the user caused print as one line,
`<prog>: error: ...`, and exit with status 2; HYDRA_FULL_ERROR=1 shows the traceback.
SIGINT/SIGTERM exit 130/143 with the command that resumes; in a submitit job, its pre-emption
signal requeues the job once the run has stopped (selftrain.run.preempt). In a multirun (-m) a
failing job is reported and the sweep goes on; at the end a sweep report gives each job's
outcome (done, resumed from a stage, running elsewhere, failed) and the exit status is 1 if any
job failed.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import hydra._internal.utils as hydra_utils
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from selftrain import UserError
from selftrain.paths import conf_dir
from selftrain.config.schema import register

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


def run_and_report(func):
    """Replaces Hydra's error printer: one line for user errors, a traceback for our bugs.
    Hydra runs a multirun through it too, so the sweep report is printed here: a Hydra callback
    would not see the jobs' outcomes, since under joblib and submitit it runs in each job's process."""
    try:
        result = func()
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
    if _is_sweep(result):
        _sweep_report([r for batch in result for r in batch])
    return result


hydra_utils.run_and_report = run_and_report


def _is_sweep(result) -> bool:
    """Whether `result` is what Hydra's multirun returns: batches of JobReturn."""
    return (isinstance(result, list) and bool(result)
            and all(isinstance(b, (list, tuple)) and all(isinstance(r, JobReturn) for r in b) for b in result))


def _outcome(value: dict) -> tuple[str, str]:
    """(kind, text) of one job's outcome, as the job wrapper returned it."""
    if "failed" in value:
        return "failed", f"failed: {value['failed']}"
    if "locked" in value:
        return "locked", f"running elsewhere (locked by {value['locked']})"
    status = value.get("status", "?")
    if value.get("gate"):
        status += f" ({value['gate']})"
    attempt = value.get("attempt")
    if not attempt:  # a job that runs no loop (selftrain-drift)
        return "done", status
    mode, first = attempt.get("mode"), attempt.get("from")
    if mode == "resume":
        return ("resumed", f"resumed from {first}: {status}") if first else ("done", f"{status} (nothing left to do)")
    if mode == "force":
        return "resumed", f"redone from {first}: {status}"
    return "done", f"{status} ({'started over' if mode == 'restart' else 'new run'})"


def _sweep_report(returns: list[JobReturn]) -> None:
    """One line per job of the sweep, named by its number and the overrides that tell it from the
    other jobs; exit 1 if any failed."""
    prog = Path(sys.argv[0]).name or "selftrain"
    lines, kinds = [], {"done": 0, "resumed": 0, "locked": 0, "failed": 0}
    overrides = [list(r.overrides or []) for r in returns]
    common = set.intersection(*map(set, overrides))
    for n, r in enumerate(returns):
        value = r._return_value
        if r.status == JobStatus.FAILED:  # an exception the job wrapper let through
            value = {"failed": f"{type(value).__name__}: {value}"}
        if not isinstance(value, dict):
            value = {"failed": f"the job returned {value!r}, not an outcome"}
        kind, text = _outcome(value)
        kinds[kind] += 1
        own = [o for o in overrides[n] if o not in common]
        job = f"job {n}" + (f" ({' '.join(own)})" if own else "")
        lines.append(f"{prog}:   {job} in {value.get('dir', '?')}: {text}")
    counts = ", ".join(f"{v} {k if k != 'locked' else 'running elsewhere'}" for k, v in kinds.items() if v)
    sys.stderr.write(f"{prog}: sweep of {len(returns)} job(s): {counts}\n" + "\n".join(lines) + "\n")
    if kinds["failed"]:
        sys.exit(1)


def user_errors_exit(job):
    """Inside a Hydra job, print a user error as one line and exit 2 (Hydra would add a line
    'Error executing job with overrides' before it). Our bugs still raise with a traceback.
    In a multirun, every job returns its outcome for the sweep report: a failing job is reported
    and returns a failure, so the sweep goes on; a job whose folder is held returns `locked`.
    An interrupt prints how to resume and exits 128 + the signal number; submitit's pre-emption
    signal requeues the job instead (selftrain.run.preempt)."""
    import functools

    from selftrain.run.lock import FolderLocked, describe

    @functools.wraps(job)
    def wrapper(cfg):
        prog = Path(sys.argv[0]).name or "selftrain"
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        me = ({"job": f"job {hc.job.num} ({hc.job.override_dirname or 'no overrides'})",
               "dir": hc.runtime.output_dir} if multirun else {})

        def failed(line: str):
            if not multirun:
                sys.stderr.write(f"{prog}: error: {line}\n")
                sys.exit(2)
            sys.stderr.write(f"{prog}: error: {me['job']}: {line}\n")
            return {**me, "failed": line}

        try:
            result = job(cfg)
            return {**me, "status": "done", **(result if isinstance(result, dict) else {})} if multirun else result
        except KeyboardInterrupt as e:
            from selftrain.run.preempt import preempt_signal, requeue
            from selftrain.run.resume import resume_command

            at = f" at {e.where}" if getattr(e, "where", None) else ""
            if getattr(e, "requeue", False):
                sys.stderr.write(f"{prog}: pre-empted ({e}{at}); finished stages and committed chunks are kept; "
                                 "handing the job to submitit to requeue\n")
                sys.stderr.flush()
                why = requeue(preempt_signal())  # on success submitit exits this process
                return failed(f"interrupted ({e}{at}) and not requeued: {why}")
            key, folder = ("hydra.sweep.dir", hc.sweep.dir) if multirun else ("hydra.run.dir", hc.runtime.output_dir)
            again = resume_command(key, Path(folder).resolve(), sys.argv)
            sys.stderr.write(f"{prog}: interrupted ({e or 'KeyboardInterrupt'}{at}); finished stages and committed "
                             f"chunks are kept; to resume, run: {again}\n")
            sys.exit(getattr(e, "exit_status", 130))
        except FolderLocked as e:
            if not multirun:
                return failed(str(e))
            sys.stderr.write(f"{prog}: {me['job']}: {e}\n")
            holder = e.holder
            return {**me, "locked": (f"{describe(holder)}; check it with 'ps -fp {holder['pid']}' on {holder['host']}"
                                     if holder else str(e))}
        except Exception as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or not (multirun or isinstance(e, UserError)):
                raise
            if isinstance(e, UserError):
                line = str(e)
            else:
                import traceback

                traceback.print_exc()
                line = f"{type(e).__name__}: {e}"
            return failed(line)
    return wrapper


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
@user_errors_exit
def _selftrain(cfg) -> dict:
    """Run the loop in Hydra's output folder; return the outcome a sweep report needs."""
    from selftrain.run.loop import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    # the runs of one sweep share a tracker group named after the sweep folder
    manifest = run(cfg, run_dir, group=Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None)
    print(f"selftrain: run finished in {run_dir} ({manifest['status']})\n"
          f"selftrain: drift report: {manifest['final_report']}\n"
          f"selftrain: dashboard: {run_dir / 'index.html'}")
    gate = manifest.get("gate")
    return {"status": manifest["status"], "attempt": manifest["attempts"][-1],
            "gate": f"stopped before {gate['stopped_before']}: {gate['reason']}" if gate else None}


@hydra.main(version_base="1.3", config_path=CONF, config_name="drift")
@user_errors_exit
def _drift(cfg) -> None:
    import datasets

    from selftrain.monitor.checkpoints import monitor_checkpoints
    from selftrain.config.checks import validate_monitor

    datasets.disable_progress_bars()
    validate_monitor(cfg.monitor)
    out = Path(cfg.out)
    report = monitor_checkpoints(cfg, out)
    n_alert = sum(a["level"] == "alert" for a in report["alerts"])
    print(f"selftrain-drift: {n_alert} alert(s), {len(report['alerts']) - n_alert} watch(es)\n"
          f"selftrain-drift: report: {out / 'report.md'}")


@hydra.main(version_base="1.3", config_path=CONF, config_name="validate")
@user_errors_exit
def _validate(cfg) -> None:
    import datasets

    from selftrain.config.checks import check_trl_fields, validate_monitor
    from selftrain.monitor.validate import run

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


# The argparse scripts' descriptions: what each command does, as `--help` prints it.
LINEAGE_HELP = ("selftrain-lineage: print a run's chain of generations (which data, from which model, under "
                "which constitution, probe suite and config) and recompute every hash its manifests record "
                "from the files on disk, one line per mismatch; exits 1 when anything no longer matches.")
DASHBOARD_HELP = ("selftrain-dashboard: rebuild each run's index.html (status, configuration, drift "
                  "trajectories, power, stage times and a transcript browser) from the run folder alone; "
                  "a run writes it itself, so this is for folders copied elsewhere or made by an older version.")
COMPARE_HELP = ("selftrain-compare: compare constitutions (arms) across finished runs, given a sweep folder "
                "(its job folders are the runs) or several run folders, with the training run as the unit "
                "of evidence; writes comparison.{json,md,html}. With --plan, read a pilot sweep instead and "
                "print the seeds per arm a powered comparison needs and the sweep that adds them.")


def lineage_main(argv: list[str] | None = None) -> int:
    """`selftrain-lineage RUN`: print the chain of generations and verify every recorded hash."""
    import argparse
    import json

    from selftrain.run.lineage import trace

    parser = argparse.ArgumentParser(prog="selftrain-lineage", description=LINEAGE_HELP)
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


def dashboard_main(argv: list[str] | None = None) -> int:
    """`selftrain-dashboard RUN [RUN ...]`: rebuild each run's index.html from its folder alone."""
    import argparse

    from selftrain.analysis.dashboard import write_dashboard
    from selftrain.run.layout import MANIFEST

    ap = argparse.ArgumentParser(prog="selftrain-dashboard", description=DASHBOARD_HELP)
    ap.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (holds manifest.json and gen-*/)")
    args = ap.parse_args(argv)
    for r in map(Path, args.runs):
        if not (r / MANIFEST).is_file():
            sys.stderr.write(f"selftrain-dashboard: error: {r}: not a selftrain run folder (no {MANIFEST})\n")
            return 2
        print(f"selftrain-dashboard: {write_dashboard(r)}")
    return 0


def compare_main(argv: list[str] | None = None) -> int:
    """`selftrain-compare DIR [DIR ...]`: compare arms (constitutions) across finished runs; reads
    only artifacts on disk (selftrain.analysis.compare). `--plan PILOT`: the seeds per arm a powered
    comparison needs, from a pilot sweep's seed-to-seed variation, and the sweep to launch."""
    import argparse

    from selftrain.analysis.compare import ITEMS, compare_runs, plan, write_comparison
    from selftrain.analysis.compare_render import render_plan

    ap = argparse.ArgumentParser(prog="selftrain-compare", description=COMPARE_HELP)
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
