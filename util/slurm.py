"""Slurm preemption handling: notice the warning signal, save at a safe point, requeue.

Job script flags::

    #SBATCH --signal=USR1@120     # send SIGUSR1 to every task 120 s before the time limit
    #SBATCH --requeue             # allow the job to be put back in the queue
    #SBATCH --open-mode=append    # the requeued run appends to the same log files

Launch the ranks with ``srun`` (one task per GPU) so every rank receives the signal; without the
``B:`` prefix slurm signals the job step's tasks, not the batch shell. Slurm also sends SIGTERM
on preemption/cancellation and SIGKILL ``KillWait`` seconds later (30 s by default), so the next
safe point must come soon after the signal.

Under torchrun, SIGTERM is how the agent stops its workers (before a restart, or when it is
stopped itself): it is left to its default action, so that a worker blocked in a collective dies at
once instead of holding the restart up until the agent's SIGKILL. Preemption then comes by SIGUSR1.

The handler only sets a flag, read after every step by util.step_control.StepControl, which makes
every rank stop at the same step; saving from inside a signal handler could interrupt a
half-finished optimizer step or a collective, and is not safe.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any, Iterable, Mapping, Optional

__all__ = ["PreemptionFlag", "ignore_preemption_signals", "install_preemption_handler", "preemption_signals",
           "requeue_job"]

logger = logging.getLogger(__name__)

# SIGUSR1 does not exist on Windows; the module must still import there.
DEFAULT_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGUSR1", "SIGTERM") if hasattr(signal, name)
)


def preemption_signals(env: Mapping[str, str]) -> tuple[int, ...]:
    """The signals that ask the run to stop politely: SIGUSR1 and SIGTERM, but not SIGTERM under a
    torchrun agent (TORCHELASTIC_RUN_ID is set), where it means "stop now"."""
    under_torchrun = "TORCHELASTIC_RUN_ID" in env
    return tuple(s for s in DEFAULT_SIGNALS if not (under_torchrun and s == getattr(signal, "SIGTERM", None)))


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
