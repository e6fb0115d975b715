"""Graceful interrupts: SIGINT/SIGTERM become a flag that the stages read at safe points.

The flag is read between chunks, training steps and stages (`check_interrupt`); the stage is
then marked `interrupted` and the CLI exits 130/143 with the command that resumes. A second
signal stops at once. In a submitit job its pre-emption signal (SIGUSR2) stops the same way and
asks for a requeue once the run has stopped (selftrain.run.preempt); with a SIGTERM a few seconds
either side of it, it is one notice, since Slurm sends both on pre-emption.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Iterator

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Raised at a safe point after SIGINT/SIGTERM (or at once after a second signal).
    `requeue`: submitit's pre-emption signal came too, so the job should be requeued."""

    def __init__(self, signum: int, immediate: bool = False, requeue: bool = False):
        self.signum, self.immediate, self.requeue = signum, immediate, requeue
        name = signal.Signals(signum).name
        super().__init__(f"{name} received" + (" twice: stopped at once" if immediate else ""))

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _Flag:
    signum: int | None = None
    requeue: bool = False
    stop: bool = False  # a SIGINT/SIGTERM came
    preempt_at: float | None = None  # when the pre-emption signal came (time.monotonic)


# Slurm sends SIGTERM and the pre-emption signal together, in either order, on pre-emption: one
# notice. A SIGTERM well after the pre-emption signal is the time limit itself: stop at once.
PAIR_S = 5.0


_FLAG = _Flag()


def check_interrupt() -> None:
    """Raise Interrupted if a signal arrived; called between chunks, training steps and stages."""
    if _FLAG.signum is not None:
        raise Interrupted(_FLAG.signum, requeue=_FLAG.requeue)


def interrupt_requested() -> bool:
    return _FLAG.signum is not None


@contextlib.contextmanager
def graceful_interrupts() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into a flag; a second one raises Interrupted at once.
    In a submitit job its pre-emption signal sets the flag too, and asks for a requeue."""
    from selftrain.run.preempt import preempt_signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    preempt = preempt_signal()
    sigs = (signal.SIGINT, signal.SIGTERM) + ((preempt,) if preempt else ())
    old = {s: signal.getsignal(s) for s in sigs}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if signum == preempt:
            _FLAG.requeue, _FLAG.preempt_at = True, time.monotonic()
            if _FLAG.signum is None:
                _FLAG.signum = signum
            log.warning("%s received (pre-emption or time limit): finishing the current chunk or step, "
                        "then stopping to be requeued", name)
            return
        paired = _FLAG.preempt_at is not None and time.monotonic() - _FLAG.preempt_at < PAIR_S
        if _FLAG.stop or (_FLAG.signum is not None and not paired):
            raise Interrupted(signum, immediate=True, requeue=_FLAG.requeue)
        _FLAG.stop = True
        if _FLAG.signum is None:
            _FLAG.signum = signum
            log.warning("%s received: finishing the current chunk or step, then stopping "
                        "(send it again to stop at once)", name)

    def reset():
        _FLAG.signum, _FLAG.requeue, _FLAG.stop, _FLAG.preempt_at = None, False, False, None

    reset()
    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        reset()
