"""Console scripts: thin Hydra shells around plain functions.

`selftrain` runs the loop (selftrain.loop.run). Errors the user caused print as one line,
`<prog>: error: ...`, and exit with status 2; HYDRA_FULL_ERROR=1 shows the traceback.
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
    'Error executing job with overrides' before it). Our bugs still raise with a traceback."""
    import functools

    @functools.wraps(job)
    def wrapper(cfg):
        try:
            return job(cfg)
        except UserError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            prog = Path(sys.argv[0]).name or "selftrain"
            sys.stderr.write(f"{prog}: error: {e}\n")
            sys.exit(2)
    return wrapper


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


def main() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    _selftrain()


def drift_main() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    _drift()


def compare_main(argv: list[str] | None = None) -> int:
    """`selftrain-compare DIR [DIR ...]`: compare arms (constitutions) across finished runs; reads
    only artifacts on disk (selftrain.compare)."""
    import argparse

    from .compare import compare_runs, write_comparison

    ap = argparse.ArgumentParser(prog="selftrain-compare", description="Compare constitutions across finished "
                                 "runs: a sweep folder (its job folders are the runs) or several run folders.")
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="a sweep folder, or run folders")
    ap.add_argument("--out", help="where comparison.{json,md,html} go (default: DIR, or the common parent "
                    "of several)")
    ap.add_argument("--allow", action="append", default=[], metavar="KEY",
                    help="a config key (or prefix, e.g. train.sft) allowed to differ between runs; repeatable")
    ap.add_argument("--items", choices=("all", "contrast", "options"), default="all",
                    help="which probe items' P(aligned) to compare (default: all)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--permutations", type=int, default=2000, help="sign-flip permutations (default 2000)")
    ap.add_argument("--rng-seed", type=int, default=0, help="seed of the resampling RNG (default 0)")
    args = ap.parse_args(argv)
    try:
        if args.bootstrap < 100 or args.permutations < 100:
            raise UserError("--bootstrap and --permutations must be at least 100")
        dirs = [Path(d) for d in args.dirs]
        out = Path(args.out) if args.out else (dirs[0] if len(dirs) == 1 else
                                               Path(os.path.commonpath([d.resolve() for d in dirs])))
        comp = compare_runs(dirs, allow=args.allow, items=args.items, n_boot=args.bootstrap,
                            n_perm=args.permutations, rng_seed=args.rng_seed)
        write_comparison(comp, out)
    except UserError as e:
        sys.stderr.write(f"selftrain-compare: error: {e}\n")
        return 2
    print(f"selftrain-compare: {comp['verdict']['headline']}\n"
          f"selftrain-compare: report: {out / 'comparison.md'} (and comparison.html, comparison.json)")
    return 0
