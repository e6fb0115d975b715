"""Pre-emption and time-out of a sweep job under submitit (hydra/launcher=submitit_slurm, submitit_local).

submitit runs each job of a sweep in a process of its own, with a handler for its pre-emption
signal (SIGUSR2, or what SUBMITIT_PREEMPT_SIGNAL names). The moment that signal arrives, the
handler asks the job for a checkpoint (Hydra's launcher answers with the same job again: same
overrides, same job folder) and requeues it: `scontrol requeue` on Slurm, exit status 144 on the
local executor, which starts the job again. Slurm sends the signal `signal_delay_s` seconds before
the time limit, and on pre-emption right after a SIGTERM (pre-emption moves the job's end to now
plus the partition's GraceTime).

Requeueing in the middle of a chunk would leave a stage running and the folder locked. So while
a run is in progress selftrain takes the signal over (interrupts.graceful_interrupts): as for SIGTERM,
it finishes the chunk or training step, marks the run interrupted and releases the folder's lock.
Only then does the CLI hand the signal to submitit's handler (`requeue`), and the requeued job
resumes from the last committed chunk or stage. submitit counts time-outs, not pre-emptions,
against hydra.launcher.max_num_timeout.
"""
from __future__ import annotations

import os
import signal


def preempt_signal() -> signal.Signals | None:
    """submitit's pre-emption signal when this process is a submitit job, else None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def requeue(signum: int) -> str:
    """Hand the pre-emption signal to submitit's handler, which requeues the job and exits this
    process (SystemExit). Returns why the job was not requeued when it was not."""
    handler = signal.getsignal(signum)
    if not callable(handler):
        return "this process has no submitit handler for it"
    try:
        handler(signum, None)
    except Exception as e:  # submitit.core.utils.UncompletedJobError: e.g. timed out too many times
        return str(e).strip().rstrip(".")
    return "submitit's handler returned without requeueing"
