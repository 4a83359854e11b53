"""Faults: --auto_resume continues from the newest readable checkpoint of the run (a truncated or
corrupt one is named in a warning and the next newest is used; none readable starts the run afresh),
and a hung peer fails the job after --dist_timeout with a message naming the rank and step."""
import json
import os
import subprocess
import sys

import pytest
import torch

from e2e import TINY, run_main
from test_train_eval import REPO, _free_port, coco_dir  # noqa: F401 (a fixture)

TIMEOUT_MINUTES = 0.1  # 6 s


@pytest.fixture(scope="module")
def two_epochs(coco_dir, module_tmp):
    out = module_tmp("two_epochs")
    run_main("--coco_path", coco_dir, "--epochs", "2", "--output_dir", out, "--save_every_epoch", "1")
    return out


def _copy(run, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    return copy


def _epochs(run):
    return [json.loads(line)["epoch"] for line in (run / "log.txt").read_text().splitlines()]


def test_a_truncated_newest_checkpoint_falls_back_to_the_next(two_epochs, coco_dir, tmp_path, capsys):
    run = _copy(two_epochs, tmp_path)
    latest = run / "checkpoint.pth"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a write cut short
    with pytest.warns(UserWarning, match="checkpoint.pth cannot be read"):
        run_main("--coco_path", coco_dir, "--epochs", "3", "--output_dir", run, "--auto_resume")
    assert (f"Resuming from {run / 'checkpoint0001.pth'} (--auto_resume: the newest readable checkpoint of this run"
            in capsys.readouterr().out)
    assert _epochs(run) == [0, 1, 2]  # epoch 2 only was trained
    assert torch.load(latest, weights_only=True)["epoch"] == 2


def test_corrupt_epoch_checkpoints_are_skipped_down_to_a_readable_one(two_epochs, coco_dir, tmp_path):
    run = _copy(two_epochs, tmp_path)
    (run / "checkpoint.pth").write_bytes(b"not a checkpoint")
    (run / "checkpoint0001.pth").write_bytes(b"\x00" * 100)
    with pytest.warns(UserWarning) as caught:
        run_main("--coco_path", coco_dir, "--epochs", "2", "--output_dir", run, "--auto_resume")
    named = [str(w.message) for w in caught if "cannot be read" in str(w.message)]
    assert len(named) == 2 and "checkpoint.pth" in named[0] and "checkpoint0001.pth" in named[1]
    assert _epochs(run) == [0, 1, 1]  # resumed from checkpoint0000.pth: epoch 1 trained again


def test_none_readable_starts_afresh(two_epochs, coco_dir, tmp_path):
    run = _copy(two_epochs, tmp_path)
    for f in run.glob("checkpoint*.pth"):
        f.write_bytes(b"")
    (run / "log.txt").unlink()
    with pytest.warns(UserWarning, match="can be read; starting the run afresh"):
        run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", run, "--auto_resume")
    assert _epochs(run) == [0]


@pytest.mark.slow
def test_a_hung_peer_fails_the_collective_naming_rank_and_step(coco_dir, tmp_path):
    """A peer stalled longer than --dist_timeout: the waiting rank fails within seconds (not NCCL's
    or gloo's default half hour) and says which rank, epoch and step, so that a restart takes over."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "tests/dist_timeout_check.py", *TINY, "--coco_path", str(coco_dir),
           "--epochs", "1", "--output_dir", str(tmp_path), "--dist_timeout", str(TIMEOUT_MINUTES)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "CollectiveTimeoutError: rank 0 of 2: a collective at epoch 0, step 1 waited longer than " \
           "--dist_timeout" in output, output[-3000:]


def test_checkpoint_steps_bounds_what_a_crash_costs(coco_dir, tmp_path, monkeypatch):
    """--checkpoint_steps 2: a crash at step 3 of 4 leaves the checkpoint of step 2, from which
    --auto_resume finishes the epoch (2 steps, not 4)."""
    import engine
    real_step, calls = engine.train_step, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(kwargs.get("where"))
        if len(calls) == 4:
            raise MemoryError("killed")  # what the OOM killer leaves of a process, as near as one can get
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", crash_at_step_3)
    flags = ["--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path, "--checkpoint_steps", "2",
             "--auto_resume"]
    with pytest.raises(MemoryError):
        run_main(*flags)
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (0, 2, 2)
    assert len(saved["rng_per_rank"]) == 1 and torch.equal(saved["rng_per_rank"][0]["torch"], saved["rng"]["torch"])
    calls.clear()
    monkeypatch.setattr(engine, "train_step", real_step)
    run_main(*flags)
    done = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (done["epoch"], done.get("step", 0), done["global_step"]) == (0, 0, 4)
    assert _epochs(tmp_path) == [0]


def test_each_rank_restores_its_own_random_state(monkeypatch):
    import util.misc as utils
    from util.resume import restore_rng
    from util.rng import get_rng_state
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(get_rng_state())
    ckpt = {"rng": states[0], "rng_per_rank": states}
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(utils, "get_rank", lambda: 1)
    restore_rng(ckpt)
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])
    # another process count: every rank a stream of its own (one state for all would give every
    # rank the same dropout masks)
    monkeypatch.setattr(utils, "get_world_size", lambda: 4)
    drawn = []
    for rank in range(4):
        monkeypatch.setattr(utils, "get_rank", lambda: rank)
        restore_rng(ckpt, seed=42)
        drawn.append(torch.rand(8))
    assert all(not torch.equal(drawn[i], drawn[j]) for i in range(4) for j in range(i + 1, 4))
    restore_rng(ckpt, seed=42)  # the same rank, seed, epoch and step: the same stream
    assert torch.equal(torch.rand(8), drawn[3])
    monkeypatch.setattr(utils, "get_world_size", lambda: 1)  # one process: the saver's state
    restore_rng(ckpt)
    assert torch.equal(torch.get_rng_state(), states[0]["torch"])


def test_checkpoint_minutes_writes_mid_epoch_checkpoints(coco_dir, tmp_path, monkeypatch):
    """--checkpoint_minutes (here 6 ms, so due at every step): a crash at step 4 of 4 finds the
    checkpoint of step 3."""
    import engine
    real_step, calls = engine.train_step, []

    def crash_at_last_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise MemoryError("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", crash_at_last_step)
    with pytest.raises(MemoryError):
        run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path, "--checkpoint_minutes", "0.0001")
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 3)


def test_checkpoint_clock():
    from util.slurm import PreemptionFlag
    from util.step_control import StepControl
    now = [0.0]
    assert not StepControl(PreemptionFlag(), checkpoint_minutes=0, clock=lambda: now[0] + 1e9).checkpoint_due()
    control = StepControl(PreemptionFlag(), checkpoint_minutes=1, clock=lambda: now[0])
    now[0] = 59.0
    assert not control.checkpoint_due()
    now[0] = 60.0
    assert control.checkpoint_due()
    control.checkpoint_written()
    assert not control.checkpoint_due()
