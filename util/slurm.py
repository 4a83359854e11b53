"""Slurm preemption handling: notice the warning signal, save at a safe point, requeue.

Job script flags::

    #SBATCH --signal=USR1@120     # send SIGUSR1 to every task 120 s before the time limit
    #SBATCH --requeue             # allow the job to be put back in the queue
    #SBATCH --open-mode=append    # the requeued run appends to the same log files

Launch the ranks with ``srun`` (one task per GPU) so every rank receives the signal; without the
``B:`` prefix slurm signals the job step's tasks, not the batch shell. Slurm also sends SIGTERM
on preemption/cancellation and SIGKILL ``KillWait`` seconds later (30 s by default), so the next
safe point must come soon after the signal.

Usage in the training loop::

    poll = PreemptionPoll(install_preemption_handler())
    for samples, targets in loader:
        ...; optimizer.step()
        if poll():                              # same answer on every rank, at the same step
            if is_main_process():
                save_training_checkpoint(...)   # atomic
                requeue_job()
            sys.exit(0)
    poll.drain()

The handler only sets a flag: saving from inside a signal handler could interrupt a half-finished
optimizer step or a collective, and is not safe.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

__all__ = ["PreemptionFlag", "PreemptionPoll", "ignore_preemption_signals", "install_preemption_handler",
           "requeue_job"]

logger = logging.getLogger(__name__)

# SIGUSR1 does not exist on Windows; the module must still import there.
DEFAULT_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGUSR1", "SIGTERM") if hasattr(signal, name)
)


class PreemptionFlag:
    """Set by the signal handler; read by the training loop at safe points."""

    def __init__(self) -> None:
        self.requested: bool = False
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        # Nothing but two assignments: anything heavier is unsafe at an arbitrary bytecode.
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        """Put back the handlers that were installed before ``install_preemption_handler``."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def install_preemption_handler(signals: Iterable[int] = DEFAULT_SIGNALS) -> PreemptionFlag:
    """Install a flag-setting handler for ``signals`` (main thread only) and return the flag."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_preemption_handler must be called from the main thread (Python signal rule)")
    flag = PreemptionFlag()
    for signum in signals:
        flag._previous[signum] = signal.signal(signum, flag._handle)
    return flag


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers ignore the preemption signals.

    srun and scancel signal every process of the job step, data workers included; a worker
    killed by it would crash the main process before it can save. The main process handles the
    signal and shuts its workers down itself.
    """
    del worker_id
    for signum in DEFAULT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class PreemptionPoll:
    """``poll()``: whether any rank got a preemption signal, the same answer on every rank.

    Ranks may receive the signal at different steps; stopping on a per-rank answer would leave
    the others waiting in the next collective. Without torch.distributed it is the local flag.
    Under DDP each call starts an all-reduce (MAX) of the local flag on a CPU (gloo) group of its
    own, in the background, and answers with the result of the one the previous call started,
    long finished by then: the answer comes one step after the signal, and no step waits for a
    GPU, a host read or the network. Every rank must call it once per step and ``drain()`` at
    the same points (the end of an epoch).

    The same all-reduce carries a second flag, ``checkpoint_due``: whether any rank's
    ``checkpoint_clock`` says a timed checkpoint is due (main.py: --checkpoint_minutes), so that
    every rank agrees on the step at which to write it.
    """

    def __init__(self, flag: PreemptionFlag, timeout: Optional[datetime.timedelta] = None,
                 checkpoint_clock: Optional[Callable[[], bool]] = None) -> None:
        """timeout: how long its all-reduce may wait for a peer (main.py: --dist_timeout);
        checkpoint_clock: this rank's "a timed checkpoint is due" (None: never)."""
        self.flag = flag
        self.checkpoint_clock = checkpoint_clock or (lambda: False)
        self.checkpoint_due = False  # the agreed answer of the last call
        self._distributed = dist.is_available() and dist.is_initialized()
        # a group of its own: its background all-reduces never queue behind DDP's or the losses'
        self._group = dist.new_group(backend="gloo", timeout=timeout) if self._distributed else None
        self._pending: Optional[tuple[Any, torch.Tensor]] = None

    def __call__(self) -> bool:
        if not self._distributed:
            self.checkpoint_due = self.checkpoint_clock()
            return self.flag.requested
        answer = self.drain()
        local = torch.tensor([int(self.flag.requested), int(self.checkpoint_clock())])
        work = dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, local)
        return answer

    def drain(self) -> bool:
        """Waits for the all-reduce in flight, if any; -> its answer (False when none), and sets
        ``checkpoint_due`` from it.

        A signal it reports is not lost when the caller drops the answer: the local flag stays
        set, so the next call's all-reduce reports it again.
        """
        self.checkpoint_due = False
        if self._pending is None:
            return False
        work, value = self._pending
        self._pending = None
        work.wait()
        self.checkpoint_due = bool(value[1])
        return bool(value[0])


def requeue_job(timeout_s: float = 60.0) -> bool:
    """Run ``scontrol requeue $SLURM_JOB_ID``; True on success, False (logged) otherwise.

    Call it on one rank only, after the checkpoint is saved: requeueing a running job ends it.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        logger.warning("Not requeueing: SLURM_JOB_ID is not set (not running under slurm)")
        return False
    command = ["scontrol", "requeue", job_id]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        logger.error("Could not requeue job %s: 'scontrol' is not on PATH", job_id)
        return False
    except subprocess.TimeoutExpired:
        logger.error("Could not requeue job %s: '%s' did not finish in %.0f s", job_id, " ".join(command), timeout_s)
        return False
    if result.returncode != 0:
        logger.error(
            "Could not requeue job %s: '%s' exited with %d: %s",
            job_id, " ".join(command), result.returncode, (result.stderr or "").strip(),
        )
        return False
    logger.info("Requeued slurm job %s", job_id)
    return True
