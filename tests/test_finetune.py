"""--finetune: a new run from a trained detector, for a dataset with other classes (util/finetune.py)."""
import argparse
import json
import math
import shutil

import pytest
import torch

import main as train_main
from datasets.coco_categories import COCO_CLASS_ROWS
from e2e import TINY, parse, run_main
from models import CheckpointMismatchError, build_model
from models.sam_detr import PRIOR_PROB
from test_train_eval import _torchrun, coco_dir  # noqa: F401 (a fixture)
from util.finetune import shared_classes

# the new dataset: the generated shapes, renamed; "person" and "Car" are COCO classes (ids 1 and 3),
# "square" a class of the generated shapes (id 2)
NEW_CATEGORIES = {1: "person", 2: "square", 3: "Car"}
FOCAL_PRIOR_BIAS = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)


@pytest.fixture(scope="module")
def renamed_dir(coco_dir, module_tmp):
    """coco_dir's images with NEW_CATEGORIES as the category names."""
    root = module_tmp("renamed")
    shutil.copytree(coco_dir, root, dirs_exist_ok=True)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}2017.json"
        data = json.loads(path.read_text())
        data["categories"] = [{"id": cid, "name": name} for cid, name in NEW_CATEGORIES.items()]
        path.write_text(json.dumps(data))
    return root


def official_checkpoint(path, meta_arch: str, epochs: int = 50, model_flags=()):
    """A checkpoint as the official code writes it: the weights of a COCO model (91 class ids), the
    argparse Namespace of its run (without --meta_arch, which the official code does not have), an
    optimizer state, and no category names. The tiny architecture keeps the test fast."""
    args = parse("--num_classes", str(COCO_CLASS_ROWS), "--meta_arch", meta_arch, "--epochs", str(epochs), *model_flags)
    torch.manual_seed(1)
    model, _, _ = build_model(args)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()  # every value "trained", unlike a new model's
    flags = {k: v for k, v in vars(args).items() if k not in ("meta_arch", "given_flags")}
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(**flags), "epoch": epochs - 1,
                "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {}}, path)
    return model.state_dict()


def finetuned_model(monkeypatch, *flags):
    """main.main with `flags`, stopped before training: -> the model as the run starts."""
    started = {}

    def no_training(args, run, *rest):
        started["model"], started["optimizer"] = run.model_without_ddp, run.optimizer
        started["start_epoch"] = args.start_epoch

    monkeypatch.setattr(train_main, "train", no_training)
    run_main(*flags)
    return started


# case -> (--meta_arch, switches of the checkpoint's run, flags both give); the fine-tuning command gives
# neither --meta_arch nor the switches (DC5 needs a Bottleneck ResNet: e2e.TINY's resnet18 has none)
OFFICIAL_CASES = {"sam_detr": ("sam_detr", (), ()), "detr": ("detr", (), ()),
                  "ms_smca": ("sam_detr", ("--multiscale", "--smca"), ()),
                  "dc5_avgpool": ("sam_detr", ("--dilation", "--sam_resample", "avgpool"), ("--backbone", "resnet50"))}


@pytest.mark.parametrize("case", OFFICIAL_CASES)
def test_an_official_coco_checkpoint_finetunes_to_four_classes_keeping_person(
        case, renamed_dir, tmp_path, monkeypatch, capsys):
    meta_arch, switches, both = OFFICIAL_CASES[case]
    ckpt = tmp_path / "official.pth"
    theirs = official_checkpoint(ckpt, meta_arch, epochs=50, model_flags=switches + both)
    # a 50-epoch checkpoint (no GroupNorm after a single-scale input_proj) fine-tuned for 12 epochs;
    # --meta_arch is read off the weights, the other model flags from the checkpoint's Namespace
    started = finetuned_model(monkeypatch, "--coco_path", renamed_dir, "--epochs", "12", *both,
                              "--finetune", ckpt, "--output_dir", tmp_path / "run")
    out = capsys.readouterr().out
    assert "Fine-tuning: 2 classes keep their trained rows, by name (checkpoint id -> new id): person (1 -> 1), " \
           "Car (3 -> 3)" in out, out
    assert "read as COCO 2017's" in out
    mine = started["model"].state_dict()
    heads = [k for k in mine if k.startswith("class_embed.")]
    assert len(heads) == (2 * 2 if meta_arch == "sam_detr" else 2)  # two decoder layers in e2e.TINY
    for key in theirs:
        if key in heads:
            continue
        assert torch.equal(mine[key], theirs[key]), key
    for key in heads:
        for new_id in (1, 3):  # person and car: the same ids in COCO and here
            assert torch.equal(mine[key][new_id], theirs[key][new_id]), key
        assert not torch.equal(mine[key][2], theirs[key][2]), key  # "square" (COCO's 2 is bicycle): a new row
        assert mine[key].shape[0] == 4 + (meta_arch == "detr")
    if meta_arch == "sam_detr":
        # the new rows have the focal prior of a new model, the kept ones the checkpoint's
        assert torch.allclose(mine["class_embed.0.bias"][[0, 2]], torch.full((2,), FOCAL_PRIOR_BIAS))
        assert ("--input_proj_norm=off" in out) == ("--multiscale" not in switches)  # single scale: its weights
        taken = out.split("model flags from the checkpoint:")[1].splitlines()[0]
        assert all(f"{flag}=" in taken for flag in switches if flag.startswith("--")), taken
    else:
        assert not torch.equal(mine["class_embed.weight"][4], theirs["class_embed.weight"][COCO_CLASS_ROWS])
    # the optimizer and schedule start afresh
    assert started["start_epoch"] == 0 and not started["optimizer"].state


def test_fresh_heads_keep_no_class(renamed_dir, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "official.pth"
    theirs = official_checkpoint(ckpt, "sam_detr")
    started = finetuned_model(monkeypatch, "--coco_path", renamed_dir, "--finetune", ckpt, "--finetune_fresh_heads",
                              "--output_dir", tmp_path / "run")
    assert "no class rows kept (--finetune_fresh_heads)" in capsys.readouterr().out
    assert not torch.equal(started["model"].state_dict()["class_embed.0.weight"][1], theirs["class_embed.0.weight"][1])


def test_finetuning_trains_then_auto_resume_continues_its_own_run(coco_dir, renamed_dir, tmp_path, capsys):
    """A checkpoint of this project (its category names stored) fine-tuned for an epoch under torchrun,
    then the same command with --epochs 2 continues the fine-tuning run's own checkpoint."""
    source = tmp_path / "source"
    run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", source)
    capsys.readouterr()
    flags = ["--coco_path", renamed_dir, "--finetune", source / "checkpoint.pth", "--auto_resume",
             "--output_dir", tmp_path / "ft", "--lr_drop", "1"]
    # two processes: each draws its own new class heads, DDP gives them rank 0's
    out = _torchrun("main.py", *TINY, *flags, "--epochs", "1").stdout
    # the source's classes are circle, square, triangle
    assert "1 class keeps its trained rows" in out and "square (2 -> 2)" in out and "Starting from" in out
    ckpt = torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)
    assert ckpt["class_names"] == NEW_CATEGORIES and ckpt["args"]["finetune"] == str(source / "checkpoint.pth")
    run_main(*flags, "--epochs", "2")
    out = capsys.readouterr().out
    assert "Resuming from" in out and "--finetune" in out and "only starts a run, and this one has started" in out
    assert "Fine-tuning from" not in out
    assert len((tmp_path / "ft" / "log.txt").read_text().splitlines()) == 2


def test_other_mismatches_stop_naming_the_flag(renamed_dir, tmp_path, monkeypatch):
    ckpt = tmp_path / "official.pth"
    official_checkpoint(ckpt, "sam_detr")
    with pytest.raises(CheckpointMismatchError, match="--dec_layers 2"):
        finetuned_model(monkeypatch, "--coco_path", renamed_dir, "--finetune", ckpt, "--dec_layers", "3",
                        "--output_dir", tmp_path / "run")


def test_resume_of_a_checkpoint_with_other_classes_names_finetune(renamed_dir, tmp_path, monkeypatch):
    ckpt = tmp_path / "official.pth"
    official_checkpoint(ckpt, "sam_detr")
    with pytest.raises(CheckpointMismatchError, match=r"--num_classes 91 .*--finetune CKPT"):
        finetuned_model(monkeypatch, "--coco_path", renamed_dir, "--resume", ckpt, "--output_dir", tmp_path / "run")


def test_finetune_flags_that_contradict_stop(renamed_dir, tmp_path):
    ckpt = tmp_path / "official.pth"
    official_checkpoint(ckpt, "sam_detr")
    with pytest.raises(SystemExit, match="--finetune starts a training run; to evaluate"):
        run_main("--coco_path", renamed_dir, "--finetune", ckpt, "--eval")
    with pytest.raises(SystemExit, match="both start a run from a checkpoint"):
        run_main("--coco_path", renamed_dir, "--finetune", ckpt, "--resume", ckpt)
    with pytest.raises(SystemExit, match="--finetune: no such file"):
        run_main("--coco_path", renamed_dir, "--finetune", tmp_path / "missing.pth")


def test_shared_classes_match_names_once_within_both_heads():
    theirs = {1: "person", 2: "Car", 3: "dog", 4: "dog", 90: "toothbrush"}
    mine = {1: "car ", 2: "PERSON", 3: "dog", 5: "toothbrush", 6: "cat"}
    # "dog" is two checkpoint classes: ambiguous, not kept; toothbrush's new id is outside the new head
    assert shared_classes(theirs, mine, their_rows=91, my_rows=5) == {1: 2, 2: 1}
