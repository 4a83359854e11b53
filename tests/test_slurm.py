"""Preemption flag and requeue (util/slurm.py)."""
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest

from util import slurm
from util.slurm import install_preemption_handler, preemption_signals, requeue_job

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")


@pytest.fixture
def flag():
    """Installs the handlers and always puts the previous ones back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    flag = install_preemption_handler()
    yield flag
    flag.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigusr1_sets_flag(flag):
    assert not flag.requested
    # A real signal through the kernel, as slurm sends it.
    os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.monotonic() + 5.0
    # Python runs the handler at the next bytecode boundary in the main thread; wait briefly.
    while not flag.requested and time.monotonic() < deadline:
        time.sleep(0.01)
    assert flag.requested
    assert flag.signal_name == "SIGUSR1"


def test_sigterm_handler_only_sets_flag(flag):
    handler = signal.getsignal(signal.SIGTERM)
    # Called directly rather than delivered, so a broken install cannot kill the test run.
    handler(signal.SIGTERM, None)
    assert flag.requested and flag.signal_name == "SIGTERM"


def test_requeue_calls_scontrol_with_job_id(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    done = subprocess.CompletedProcess(["scontrol"], returncode=0, stdout="", stderr="")
    with mock.patch.object(slurm.subprocess, "run", return_value=done) as run:
        assert requeue_job() is True
    run.assert_called_once()
    assert run.call_args.args[0] == ["scontrol", "requeue", "4242"]
    assert run.call_args.kwargs.get("shell", False) is False


def test_requeue_outside_slurm(monkeypatch, caplog):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with mock.patch.object(slurm.subprocess, "run") as run:
        assert requeue_job() is False
    run.assert_not_called()
    assert "SLURM_JOB_ID" in caplog.text


def test_requeue_failure_is_logged(monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    failed = subprocess.CompletedProcess(["scontrol"], returncode=1, stdout="", stderr="Invalid job id")
    with mock.patch.object(slurm.subprocess, "run", return_value=failed):
        assert requeue_job() is False
    assert "Invalid job id" in caplog.text
    with mock.patch.object(slurm.subprocess, "run", side_effect=FileNotFoundError("scontrol")):
        assert requeue_job() is False
    assert "not on PATH" in caplog.text


def test_data_workers_ignore_preemption_signals():
    """A worker must survive the signal that srun sends to every process of the step."""
    import multiprocessing

    from util.slurm import ignore_preemption_signals

    def worker(queue):
        ignore_preemption_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        queue.put("alive")

    queue = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(target=worker, args=(queue,))
    process.start()
    process.join(timeout=30)
    assert process.exitcode == 0 and queue.get(timeout=5) == "alive"


def test_sigterm_is_left_to_torchrun():
    """Under a torchrun agent SIGTERM means "stop now" (before a restart): not a preemption."""
    assert preemption_signals({}) == (signal.SIGUSR1, signal.SIGTERM)
    assert preemption_signals({"TORCHELASTIC_RUN_ID": "job"}) == (signal.SIGUSR1,)


SLEEPER = """
import os, sys, time
sys.path.insert(0, os.getcwd())
from util.slurm import install_preemption_handler, preemption_signals
install_preemption_handler(preemption_signals(os.environ))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_a_worker_told_to_stop_by_torchrun_stops_at_once(under_torchrun):
    """torchrun stops the survivors of a failed group with SIGTERM, then SIGKILL 30 s later: a worker
    under torchrun dies at once; a plain slurm task only notes it (and saves at its next step)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("TORCHELASTIC_RUN_ID", None)
    if under_torchrun:
        env["TORCHELASTIC_RUN_ID"] = "job"
    process = subprocess.Popen([sys.executable, "-c", SLEEPER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        if under_torchrun:
            assert process.wait(timeout=5) == -signal.SIGTERM
        else:
            with pytest.raises(subprocess.TimeoutExpired):
                process.wait(timeout=1)
    finally:
        process.kill()
        process.wait()
