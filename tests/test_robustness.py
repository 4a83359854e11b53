"""Runs that go wrong: a non-finite loss, preemption mid-epoch, flags that do not fit a checkpoint."""
import json

import pytest
import torch

import engine
import main as train_main
from datasets.synthetic import make_synthetic_coco
from e2e import run_main


@pytest.fixture(scope="module")
def coco_dir(module_tmp):
    root = module_tmp("shapes")
    make_synthetic_coco(out_dir=root, num_train=8, num_val=2, image_size=96, seed=3)
    return root


def test_non_finite_loss_stops_with_terms_and_keeps_last_checkpoint(coco_dir, tmp_path, monkeypatch):
    run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path)
    before = (tmp_path / "checkpoint.pth").read_bytes()
    real = engine.compute_losses

    def poisoned(model, criterion, samples, targets, device, amp, **kwargs):
        total, losses, outputs = real(model, criterion, samples, targets, device, amp, **kwargs)
        if model.training:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
            total = total * float("nan")
        return total, losses, outputs

    monkeypatch.setattr(engine, "compute_losses", poisoned)
    with pytest.raises(engine.NonFiniteLossError, match=r"loss_giou=nan.*") as err:
        run_main("--coco_path", coco_dir, "--epochs", "2", "--output_dir", tmp_path, "--auto_resume")
    assert "loss_ce=" in str(err.value) and "epoch 1" in str(err.value)
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    assert not (tmp_path / "checkpoint0001.pth").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_preemption_saves_mid_epoch_requeues_and_resumes(coco_dir, tmp_path, monkeypatch, capsys):
    checks, requeued = [], []

    def preempt_after_two_steps(poll):
        checks.append(1)
        return len(checks) == 2

    monkeypatch.setattr(train_main.StepControl, "local_stop", preempt_after_two_steps)
    monkeypatch.setattr(train_main, "requeue_job", lambda: requeued.append(1) or True)
    with pytest.raises(SystemExit) as stop:
        run_main("--coco_path", coco_dir, "--epochs", "2", "--output_dir", tmp_path, "--auto_resume")
    assert stop.value.code == 0 and requeued == [1]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] == 2 and "rng" in ckpt
    assert not (tmp_path / "log.txt").exists()

    # the requeued job: same command; it finishes epoch 0's last two batches, then epoch 1
    monkeypatch.setattr(train_main.StepControl, "local_stop", lambda control: False)
    capsys.readouterr()
    run_main("--coco_path", coco_dir, "--epochs", "2", "--output_dir", tmp_path, "--auto_resume")
    printed = capsys.readouterr().out
    assert "Epoch: [0]  [0/2]" in printed and "Epoch: [1]  [0/4]" in printed
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1]
    assert "step" not in torch.load(tmp_path / "checkpoint.pth", weights_only=True)


def test_custom_classes_give_a_head_of_that_width(coco_dir, tmp_path):
    run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path, "--eval_every_epoch", "5")
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert state["class_embed.0.weight"].shape[0] == 4  # category ids 1..3 -> num_classes 4


def test_category_id_beyond_num_classes_is_reported_before_training(coco_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"\b3\b"):  # a data error: stops, and is not restarted
        run_main("--coco_path", coco_dir, "--epochs", "1", "--num_classes", "3", "--output_dir", tmp_path)
    assert not (tmp_path / "checkpoint.pth").exists()
