"""tools/pretrain_backbone.py: a ResNet trained on the generated shapes, written so that
--backbone_weights loads it as it loads ImageNet weights."""
import sys
from pathlib import Path

import numpy as np
import torch

from e2e import parse
from models import build_model
from models.backbone import resnet_state_from_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import pretrain_backbone  # noqa: E402


def test_presence_labels_count_the_objects_whose_centre_the_crop_holds():
    images, present = pretrain_backbone.draw_batch(np.random.default_rng(0), 6, image_size=64)
    assert images.shape == (6, 3, 64, 64) and present.shape == (6, len(pretrain_backbone.SHAPES))
    assert set(present.unique().tolist()) <= {0.0, 1.0} and present.sum() > 0
    # the same stream gives the same batch: the held-out set is fixed by its seed
    again = pretrain_backbone.draw_batch(np.random.default_rng(0), 6, image_size=64)
    assert torch.equal(images, again[0]) and torch.equal(present, again[1])


def test_the_written_weights_load_with_backbone_weights(tmp_path):
    out = tmp_path / "r18.pth"
    pretrain_backbone.main(["--out", str(out), "--steps", "2", "--batch_size", "2", "--image_size", "64",
                            "--held_out", "4"])
    state = resnet_state_from_file(str(out))
    fresh = pretrain_backbone.build("resnet18").state_dict()
    # trained: the weights and the BatchNorm statistics moved away from a new model's
    assert not torch.equal(state["conv1.weight"], fresh["conv1.weight"])
    assert not torch.equal(state["bn1.running_mean"], fresh["bn1.running_mean"])
    args = parse("--backbone_weights", str(out))
    args.pretrained_backbone = True  # e2e.TINY turns it off
    model, _, _ = build_model(args)
    body = model.backbone[0].body
    assert torch.equal(body.conv1.weight, state["conv1.weight"])
    assert torch.equal(body.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
