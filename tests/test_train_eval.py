"""End to end on CPU with generated COCO-format data: train, checkpoint, log, evaluate, resume."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.synthetic import make_synthetic_coco
from e2e import TINY, run_main

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_LOG_KEYS = {"train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_lr",
                     "train_class_error", "test_loss", "test_loss_ce", "test_coco_eval_bbox", "epoch",
                     "n_parameters"}


@pytest.fixture(scope="module")
def coco_dir(module_tmp):
    root = module_tmp("shapes")
    make_synthetic_coco(out_dir=root, num_train=8, num_val=4, image_size=128, seed=0)
    return root


@pytest.fixture(scope="module")
def one_epoch(coco_dir, module_tmp):
    out = module_tmp("run")
    run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", out)
    return out


def test_one_epoch_writes_checkpoints_and_official_log(one_epoch):
    assert (one_epoch / "checkpoint.pth").exists() and (one_epoch / "checkpoint0000.pth").exists()
    assert (one_epoch / "eval" / "latest.pth").exists() and (one_epoch / "eval" / "0000.pth").exists()
    lines = (one_epoch / "log.txt").read_text().splitlines()
    assert len(lines) == 1
    log = json.loads(lines[0])
    assert OFFICIAL_LOG_KEYS <= set(log)
    assert log["epoch"] == 0 and len(log["test_coco_eval_bbox"]) == 12
    # our checkpoints need no allowlist
    ckpt = torch.load(one_epoch / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 0 and ckpt["args"]["num_queries"] == 20
    # the names of the training categories, for demo.py
    assert ckpt["class_names"] == {1: "circle", 2: "square", 3: "triangle"}
    torch.load(one_epoch / "eval" / "latest.pth", weights_only=True)


def test_eval_resume_prints_coco_ap(one_epoch, coco_dir, capsys):
    stats = run_main("--coco_path", coco_dir, "--epochs", "1", "--eval", "--resume", one_epoch / "checkpoint.pth")
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    assert len(stats["coco_eval_bbox"]) == 12
    # the same weights evaluated after training give the same AP as logged then
    logged = json.loads((one_epoch / "log.txt").read_text().splitlines()[0])
    assert stats["coco_eval_bbox"] == pytest.approx(logged["test_coco_eval_bbox"], abs=1e-6)


def test_eval_with_the_wrong_epochs_flag_explains(one_epoch, coco_dir):
    # trained with --epochs 1, so input_proj has the official GroupNorm; --epochs 50 has none
    with pytest.raises(RuntimeError, match=r"--epochs 12 \(any value < 25\)"):
        run_main("--coco_path", coco_dir, "--epochs", "50", "--eval", "--resume", one_epoch / "checkpoint.pth")


def test_resume_equals_training_straight_through(coco_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_main("--coco_path", coco_dir, "--epochs", "2", "--lr_drop", "1", "--output_dir", straight)
    run_main("--coco_path", coco_dir, "--epochs", "1", "--lr_drop", "1", "--output_dir", split)
    run_main("--coco_path", coco_dir, "--epochs", "2", "--lr_drop", "1", "--output_dir", split,
             "--resume", split / "checkpoint.pth")
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0, msg=name)
    assert a["lr_scheduler"] == b["lr_scheduler"]


def test_auto_resume_continues_in_output_dir(coco_dir, tmp_path):
    run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path)
    run_main("--coco_path", coco_dir, "--epochs", "2", "--output_dir", tmp_path, "--auto_resume")
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *[str(a) for a in args]]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_an_epoch(coco_dir, tmp_path):
    done = _torchrun("main.py", *TINY, "--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path)
    assert "gloo" in done.stdout + done.stderr
    # every gradient lands in DDP's buckets as it is (the 1x1 convolutions over channels-last maps)
    assert "Grad strides do not match bucket view strides" not in done.stdout + done.stderr
    log = json.loads((tmp_path / "log.txt").read_text().splitlines()[0])
    assert OFFICIAL_LOG_KEYS <= set(log)


@pytest.mark.slow
def test_two_process_gradients_equal_one_process_with_double_batch(tmp_path):
    _torchrun("tests/dist_grad_check.py", "--out", tmp_path / "ddp.pt", *TINY)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "tests/dist_grad_check.py", "--out", tmp_path / "single.pt", *TINY],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    assert ddp.keys() == single.keys() and len(ddp) > 50
    for name, grad in single.items():
        torch.testing.assert_close(ddp[name], grad, rtol=1e-4, atol=1e-6, msg=name)
