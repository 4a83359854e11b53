"""Fixtures shared by several test files."""
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import util.misc as utils
from datasets import build_dataset, category_names, get_coco_api_from_dataset
from datasets.synthetic import make_synthetic_coco
from engine import evaluate, train_one_epoch
from main import get_args_parser, param_groups
from models import build_model
from util.checkpoint import checkpoint_args_to_dict

OVERFIT_STEPS = 400
OVERFIT_BATCH = 2
OVERFIT_IMAGES = 4
OVERFIT_FLAGS = ["--backbone", "resnet18", "--no_pretrained_backbone", "--device", "cpu", "--num_classes", "4",
                 "--enc_layers", "1", "--dec_layers", "2", "--hidden_dim", "64", "--nheads", "4",
                 "--dim_feedforward", "128", "--num_queries", "20", "--val_size", "128", "--max_size", "160",
                 "--dropout", "0", "--epochs", "12", "--lr", "1e-3", "--lr_backbone", "1e-3"]


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """tmp_path_factory.mktemp for a module's fixtures. What it made is deleted once the module's
    tests are done, unless one of them failed: runs write checkpoints of ~140 MB each, and a suite
    that keeps every module's runs until it ends needs gigabytes of free disk."""
    failed_before = request.session.testsfailed
    made = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]
    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def overfitted(tmp_path_factory) -> SimpleNamespace:
    """A small model from scratch trained OVERFIT_STEPS steps on OVERFIT_IMAGES generated images,
    without augmentation (the val transforms), then evaluated on the same images (CPU, ~30 s).

    -> root (the data: train2017/, annotations/), images (the training image folder), ann (their
    annotation file), checkpoint (model, args and class names, as main.py saves them), stats
    (evaluate()'s, on the training images).
    """
    root = tmp_path_factory.mktemp("overfit")
    make_synthetic_coco(out_dir=root, num_train=OVERFIT_IMAGES, num_val=1, image_size=128, seed=1)
    images, ann = root / "train2017", root / "annotations" / "instances_train2017.json"
    args = get_args_parser().parse_args(OVERFIT_FLAGS + ["--coco_path", str(root), "--val_img_dir", str(images),
                                                         "--val_ann", str(ann)])
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # as main.py does on CPU: denormals make it ~100x slower
    try:
        model, criterion, postprocessors = build_model(args)
        dataset = build_dataset("val", args)  # the training images, val transforms
        repeated = torch.utils.data.ConcatDataset([dataset] * (OVERFIT_STEPS * OVERFIT_BATCH // len(dataset)))
        loader = torch.utils.data.DataLoader(repeated, batch_size=OVERFIT_BATCH, shuffle=True,
                                             collate_fn=utils.collate_fn)
        optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
        train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, args.clip_max_norm,
                        print_freq=50)
        val_loader = torch.utils.data.DataLoader(dataset, batch_size=OVERFIT_BATCH, collate_fn=utils.collate_fn)
        coco = get_coco_api_from_dataset(dataset)
        stats, _ = evaluate(model, criterion, postprocessors, val_loader, coco, torch.device("cpu"), print_freq=50)
    finally:
        torch.set_flush_denormal(False)
    checkpoint = Path(root / "checkpoint.pth")
    torch.save({"model": model.state_dict(), "args": checkpoint_args_to_dict(args),
                "class_names": category_names(dataset)}, checkpoint)
    return SimpleNamespace(root=root, images=images, ann=ann, checkpoint=checkpoint, stats=stats)
