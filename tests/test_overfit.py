"""The whole training stack can learn: it overfits a few generated images.

Model, criterion, matcher, train_one_epoch and evaluate together must reach a high AP50 on the
images they were trained on. A small model from scratch, no augmentation (the val transforms),
a few hundred steps on the CPU.
"""
import pytest
import torch

import util.misc as utils
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.synthetic import make_synthetic_coco
from engine import evaluate, train_one_epoch
from main import get_args_parser, param_groups
from models import build_model

STEPS = 200
BATCH = 2
MIN_AP50 = 0.5


@pytest.mark.slow
def test_overfits_a_few_images(tmp_path):
    make_synthetic_coco(out_dir=tmp_path, num_train=4, num_val=1, image_size=128, seed=1)
    train_ann = tmp_path / "annotations" / "instances_train2017.json"
    args = get_args_parser().parse_args([
        "--coco_path", str(tmp_path), "--val_img_dir", str(tmp_path / "train2017"), "--val_ann", str(train_ann),
        "--backbone", "resnet18", "--no_pretrained_backbone", "--device", "cpu", "--num_classes", "4",
        "--enc_layers", "1", "--dec_layers", "2", "--hidden_dim", "64", "--nheads", "4", "--dim_feedforward", "128",
        "--num_queries", "20", "--val_size", "128", "--max_size", "160", "--dropout", "0", "--epochs", "12",
        "--lr", "1e-3", "--lr_backbone", "1e-4"])
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # as main.py does on CPU: denormals make it ~100x slower
    try:
        model, criterion, postprocessors = build_model(args)
        images = build_dataset("val", args)  # the four training images, val transforms
        repeated = torch.utils.data.ConcatDataset([images] * (STEPS * BATCH // len(images)))
        loader = torch.utils.data.DataLoader(repeated, batch_size=BATCH, shuffle=True, collate_fn=utils.collate_fn)
        optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
        train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, args.clip_max_norm, print_freq=50)
        val_loader = torch.utils.data.DataLoader(images, batch_size=BATCH, collate_fn=utils.collate_fn)
        stats, _ = evaluate(model, criterion, postprocessors, val_loader, get_coco_api_from_dataset(images),
                            torch.device("cpu"), print_freq=50)
    finally:
        torch.set_flush_denormal(False)
    ap, ap50 = stats["coco_eval_bbox"][:2]
    assert ap50 >= MIN_AP50, f"AP50 {ap50:.3f} (AP {ap:.3f}) after {STEPS} steps"
