"""tools/aligner_gates.py: the reweighting gates' statistics, initialised against trained."""
import pytest
import torch

from datasets.synthetic import make_synthetic_coco
from e2e import TINY
from main import get_args_parser
from models import build_model
from util.checkpoint import checkpoint_args_to_dict

DECIDED_BIAS = 20.0  # sigmoid(20) ~ 1: a gate layer that has "chosen" for every channel


def _checkpoint(tmp_path, *flags):
    make_synthetic_coco(out_dir=tmp_path / "data", num_train=0, num_val=3, image_size=96, seed=0)
    args = get_args_parser().parse_args(TINY + ["--coco_path", str(tmp_path / "data"), "--seed", "7", *flags])
    torch.manual_seed(args.seed)
    model, _, _ = build_model(args)
    state = model.state_dict()
    # the trained state differs from the fresh one in one place: layer 0's content gates all open
    state["transformer.decoder.layers.0.attn1.bias"] = torch.full_like(state["transformer.decoder.layers.0.attn1.bias"],
                                                                       DECIDED_BIAS)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "args": checkpoint_args_to_dict(args)}, path)
    return path


def test_gates_of_the_trained_and_the_initialised_model(tmp_path):
    from tools import aligner_gates
    report = aligner_gates.main(["--resume", str(_checkpoint(tmp_path)), "--init", "--num_images", "2"])
    opened = "transformer.decoder.layers.0.attn1"
    assert set(report) == {"initialised", "trained"}
    assert len(report["trained"]) == 2 * 2  # attn1 and attn2 of both decoder layers
    for name, stats in report["initialised"].items():
        assert abs(stats["mean"] - 0.5) < 0.1 and stats["decisive"] < 0.05, name
    # the same seed builds the same model: layer 0's position gates, before the opened ones act, agree
    same = "transformer.decoder.layers.0.attn2"
    assert report["trained"][same] == pytest.approx(report["initialised"][same])
    assert report["trained"][opened]["decisive"] == 1.0
    assert report["trained"][opened]["mean"] > 0.99


def test_a_model_without_gates_is_named(tmp_path):
    from tools import aligner_gates
    with pytest.raises(SystemExit, match="no reweighting gates"):
        aligner_gates.main(["--resume", str(_checkpoint_without_gates(tmp_path)), "--num_images", "1"])


def _checkpoint_without_gates(tmp_path):
    make_synthetic_coco(out_dir=tmp_path / "data", num_train=0, num_val=1, image_size=96, seed=0)
    args = get_args_parser().parse_args(TINY + ["--coco_path", str(tmp_path / "data"), "--no_sam_reweight"])
    model, _, _ = build_model(args)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": checkpoint_args_to_dict(args)}, path)
    return path
