"""What the ranks decide together after each training step, and the watchdog that names a hung step.

Every rank calls ``StepControl.after_step`` once per step, in the same order, and so makes the same
collective calls and takes the same decisions at the same step:

- a mid-epoch checkpoint every ``--checkpoint_steps`` steps, and when ``--checkpoint_minutes`` have
  passed on any rank's clock since the last checkpoint;
- a stop (slurm preemption: SIGUSR1, or SIGTERM outside torchrun) when any rank was told to stop.

The per-rank facts (a signal received, a clock that says "due") are combined by an all-reduce (MAX)
on the default process group, started after one step and read after the next, so that it never
holds a step up: on CUDA the flags are device values whose copy to the host is queued behind the
all-reduce and read a step later, long after it landed (no host synchronisation of its own); on
gloo the all-reduce runs in the background. A signal or a due clock therefore acts one step after
it happened (at once with one process). No second process group or network is used: the control
works wherever training's own collectives do.

``HangWatchdog`` covers what NCCL cannot say. A collective that never completes (a peer hung or
died) leaves the host waiting on the device, and NCCL's own watchdog ends the process without
naming the step. The watchdog thread notices a device wait (``DEVICE_WAITS``) that lasts longer
than ``--dist_timeout`` and ends the process itself, naming the rank, epoch and step, before NCCL's
limit (set ``NCCL_TIMEOUT_GRACE`` later) is reached. Compiling or a slow step is no wait for the
device and never counts. On gloo a timed-out collective raises instead
(``engine.CollectiveTimeoutError``).
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

import util.misc as utils
from util.slurm import PreemptionFlag

# NCCL's own collective time-out is this much longer than --dist_timeout, so that HangWatchdog,
# which starts counting when the host begins to wait (after the collective was queued), speaks first.
NCCL_TIMEOUT_GRACE = datetime.timedelta(minutes=2)
WATCHDOG_POLL_S = 5.0
HANG_EXIT_CODE = 1  # an ordinary failure: torchrun --max-restarts and the slurm launchers restart it


def process_group_timeout(backend: str, dist_timeout: datetime.timedelta) -> datetime.timedelta:
    """The time-out given to init_process_group: --dist_timeout, plus NCCL_TIMEOUT_GRACE on NCCL."""
    return dist_timeout + NCCL_TIMEOUT_GRACE if backend == "nccl" else dist_timeout


class _FlagsAllReduce:
    """An all-reduce (MAX) of a few 0/1 flags over the default group, started now, read by `result()`."""

    def __init__(self, flags: Sequence[bool], device: torch.device):
        values = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        self._copy = self._tensor = None
        if dist.get_backend() == "nccl":
            values = utils.to_device_async(values.numpy(), device)
            work = dist.all_reduce(values, op=dist.ReduceOp.MAX, async_op=True)
            work.wait()  # the current stream waits for the all-reduce; the host does not
            self._copy = utils.HostCopy(values)
        else:
            self._work = dist.all_reduce(values, op=dist.ReduceOp.MAX, async_op=True)
            self._tensor = values

    def result(self) -> tuple:
        if self._copy is not None:
            values = self._copy.wait()
        else:
            self._work.wait()
            values = self._tensor.numpy()
        return tuple(bool(v) for v in values)


@dataclass
class StepControl:
    """The per-step rule of the training loop (see the module docstring).

    flag: this process's preemption flag (util.slurm.install_preemption_handler); checkpoint_steps,
    checkpoint_minutes: the flags (0: off); device: where training runs (the flags' device on NCCL);
    watchdog: told the epoch and step of every step (None: none runs); clock: seconds, for tests.
    """
    flag: PreemptionFlag
    checkpoint_steps: int = 0
    checkpoint_minutes: float = 0.0
    device: torch.device = torch.device("cpu")
    watchdog: Optional["HangWatchdog"] = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self):
        self._pending: Optional[_FlagsAllReduce] = None
        self._last_checkpoint = self.clock()
        self._distributed = utils.is_dist_avail_and_initialized() and utils.get_world_size() > 1
        self.epoch, self.epoch_steps, self._offset = 0, 0, 0
        self.step = 0  # steps of the current epoch done (for the record of a failure)
        self._save: Callable[[int], None] = lambda steps: None

    def begin_epoch(self, epoch: int, epoch_steps: int, save: Callable[[int], None], steps_done: int = 0) -> None:
        """An epoch of `epoch_steps` steps starts, `steps_done` of them already trained (a resumed
        epoch); `save(steps)` writes a mid-epoch checkpoint after `steps` steps of the epoch."""
        self.epoch, self.epoch_steps, self._save, self._offset = epoch, epoch_steps, save, steps_done
        self.step = steps_done
        if self.watchdog is not None:
            self.watchdog.at(epoch, steps_done)

    def checkpoint_due(self) -> bool:
        """Whether this rank's clock says a timed checkpoint is due."""
        return self.checkpoint_minutes > 0 and self.clock() - self._last_checkpoint >= self.checkpoint_minutes * 60

    def local_stop(self) -> bool:
        """Whether this process was told to stop (a preemption signal)."""
        return self.flag.requested

    def after_step(self, done: int) -> bool:
        """After the `done`-th step of this process's pass over the epoch: writes a mid-epoch
        checkpoint when one is due or the run must stop, and returns whether it must stop. Every
        rank gets the same answer at the same step."""
        steps = self.step = self._offset + done
        if self.watchdog is not None:
            self.watchdog.at(self.epoch, steps)
        stop, due = self._agreed()
        by_steps = self.checkpoint_steps > 0 and steps % self.checkpoint_steps == 0
        if (stop or by_steps or due) and steps < self.epoch_steps:  # the epoch's end has a checkpoint of its own
            self._save(steps)
            self.checkpoint_written()
        if self._distributed:
            # after any save: the clock just reset, so a "due" in flight never predates the checkpoint
            self._pending = _FlagsAllReduce((self.local_stop(), self.checkpoint_due()), self.device)
        return stop

    def end_epoch(self) -> bool:
        """At the epoch's end, every rank at the same point: waits for the all-reduce in flight and
        returns whether any rank was told to stop (the epoch checkpoint then is the last one)."""
        stop, _ = self._agreed()
        return stop

    def checkpoint_written(self) -> None:
        self._last_checkpoint = self.clock()

    def _agreed(self) -> tuple:
        """(stop, checkpoint due) as every rank sees them now."""
        if not self._distributed:
            return self.local_stop(), self.checkpoint_due()
        if self._pending is None:
            return False, False
        pending, self._pending = self._pending, None
        return pending.result()


class HangWatchdog:
    """A thread that ends the process, naming the rank, epoch and step, when a device wait lasts
    longer than `timeout` (see the module docstring). `at(epoch, step)` tells it where training is."""

    def __init__(self, timeout: datetime.timedelta, rank: int, world_size: int,
                 waits: utils.DeviceWaits = utils.DEVICE_WAITS,
                 poll_s: float = WATCHDOG_POLL_S, on_hang: Optional[Callable[[str], None]] = None):
        self.timeout_s = timeout.total_seconds()
        self.rank, self.world_size, self.waits = rank, world_size, waits
        self.where = "before the first step"
        self._on_hang = on_hang or _exit_with_message
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
        self._thread.start()

    def at(self, epoch: int, step: int) -> None:
        self.where = f"epoch {epoch}, step {step}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            since = self.waits.since
            if since is not None and time.monotonic() - since > self.timeout_s:
                self._on_hang(
                    f"CollectiveTimeoutError: rank {self.rank} of {self.world_size}: at {self.where} the device "
                    f"has not finished for longer than --dist_timeout ({self.timeout_s / 60:g} minutes): a "
                    f"collective is stuck (a peer process hung or died). Exiting so that the job can be "
                    f"restarted (torchrun --max-restarts, or a slurm requeue) and resume from its last checkpoint.")
                return


def _exit_with_message(message: str) -> None:
    """Prints `message` and ends the process at once: the main thread is stuck in the device wait."""
    print(message, file=sys.stderr, flush=True)
    os._exit(HANG_EXIT_CODE)
