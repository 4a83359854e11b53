"""The original DETR's parts (`--meta_arch detr`): defaults and refused flags, the softmax matcher
and criterion written out, the post-processor, the architecture of a checkpoint. The numbers of
the whole model are held to DETR's own code by tests/test_parity.py."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from main import get_args_parser
from models import CheckpointMismatchError, apply_meta_arch_defaults, build_model, load_weights
from models.criterion import SoftmaxSetCriterion
from models.detr import DETRPostProcess
from models.matcher import SoftmaxHungarianMatcher, pack_targets
from test_model_units import brute_force_min, random_boxes
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

SMALL = ["--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--hidden_dim", "32",
         "--nheads", "4", "--backbone", "resnet18", "--no_pretrained_backbone", "--device", "cpu"]
EOS_COEF = 0.1


def parse(*flags):
    return get_args_parser().parse_args(SMALL + list(flags))


# ----------------------------------------------------------------------------- flags
def test_detr_defaults_unless_given():
    args = parse("--meta_arch", "detr")
    apply_meta_arch_defaults(args)
    assert (args.num_queries, args.set_cost_class, args.cls_loss_coef, args.eos_coef) == (100, 1.0, 1.0, EOS_COEF)
    assert args.focal_alpha is None
    given = parse("--meta_arch", "detr", "--num_queries", "50", "--cls_loss_coef", "3", "--eos_coef", "0.2")
    apply_meta_arch_defaults(given)
    assert (given.num_queries, given.set_cost_class, given.cls_loss_coef, given.eos_coef) == (50, 1.0, 3.0, 0.2)


def test_sam_detr_defaults_are_the_official_ones():
    args = parse()
    apply_meta_arch_defaults(args)
    assert (args.meta_arch, args.num_queries, args.set_cost_class, args.cls_loss_coef, args.focal_alpha) == \
        ("sam_detr", 300, 2.0, 2.0, 0.25)
    assert args.eos_coef is None
    apply_meta_arch_defaults(args)  # idempotent: the filled values count as defaults, not as given flags
    assert args.num_queries == 300


@pytest.mark.parametrize("flags, named", [
    (["--smca"], "--smca"), (["--multiscale", "--roi_align", "kernel"], "--multiscale, --roi_align"),
    (["--focal_alpha", "0.5"], "--focal_alpha"), (["--lr_linear_proj_names", "sampling_offsets"],
                                                  "--lr_linear_proj_names")])
def test_flags_meaningless_for_detr_are_refused_by_name(flags, named):
    with pytest.raises(ValueError, match=f"{named}.* mean nothing for --meta_arch detr"):
        build_model(parse("--meta_arch", "detr", *flags))


def test_eos_coef_is_refused_for_sam_detr():
    with pytest.raises(ValueError, match="--eos_coef mean nothing for --meta_arch sam_detr"):
        build_model(parse("--eos_coef", "0.1"))


# ----------------------------------------------------------------------------- matcher and criterion
def naive_softmax_cost(logits, boxes, labels, tgt_boxes, weights):
    """DETR's matching cost written out entry by entry."""
    cost = torch.zeros(len(logits), len(labels), dtype=torch.float64)
    prob = logits.double().softmax(-1)
    for i, j in itertools.product(range(len(logits)), range(len(labels))):
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[i:i + 1]).double(),
                                   box_cxcywh_to_xyxy(tgt_boxes[j:j + 1]).double())[0, 0]
        cost[i, j] = (-weights[0] * prob[i, labels[j]] + weights[1] * (boxes[i] - tgt_boxes[j]).abs().sum()
                      - weights[2] * giou)
    return cost


@pytest.mark.parametrize("num_targets", [[0, 2], [3, 1], [4, 4]])
def test_softmax_matcher_equals_brute_force(num_targets):
    gen = torch.Generator().manual_seed(10 + sum(num_targets))
    batch, queries, classes = len(num_targets), 5, 6
    weights = (1.0, 5.0, 2.0)
    outputs = {"pred_logits": torch.randn(batch, queries, classes + 1, generator=gen),
               "pred_boxes": torch.stack([random_boxes(queries, gen) for _ in range(batch)])}
    targets = [{"labels": torch.randint(0, classes, (n,), generator=gen), "boxes": random_boxes(n, gen)}
               for n in num_targets]
    for b, ((rows, cols), t) in enumerate(zip(SoftmaxHungarianMatcher(*weights)(outputs, targets), targets)):
        assert len(rows) == len(t["labels"])
        if len(rows):
            cost = naive_softmax_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], t["labels"], t["boxes"],
                                      weights)
            assert cost[rows, cols].sum().item() == pytest.approx(brute_force_min(cost).item(), rel=1e-5)


def test_softmax_loss_ce_is_weighted_cross_entropy_per_layer():
    """Every layer's loss_ce is F.cross_entropy with DETR's class weights, unmatched queries
    targeting "no object"."""
    gen = torch.Generator().manual_seed(4)
    layers, batch, queries, classes = 3, 2, 6, 4
    matcher = SoftmaxHungarianMatcher(1.0, 5.0, 2.0)
    criterion = SoftmaxSetCriterion(classes, matcher, {"loss_ce": 1.0}, eos_coef=EOS_COEF)
    logits = torch.randn(layers, batch, queries, classes + 1, generator=gen)
    boxes = torch.stack([torch.stack([random_boxes(queries, gen) for _ in range(batch)]) for _ in range(layers)])
    targets = [{"labels": torch.tensor([1, 3]), "boxes": random_boxes(2, gen)},
               {"labels": torch.tensor([0]), "boxes": random_boxes(1, gen)}]
    outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
               "aux_outputs": [{"pred_logits": l, "pred_boxes": b} for l, b in zip(logits[:-1], boxes[:-1])]}
    losses = criterion.layer_losses(outputs, targets)["loss_ce"]
    weight = torch.ones(classes + 1)
    weight[-1] = EOS_COEF
    for layer in range(layers):
        target = torch.full((batch, queries), classes)
        for b, (q, t) in enumerate(matcher.forward({"pred_logits": logits[layer], "pred_boxes": boxes[layer]},
                                                   targets)):
            target[b, q] = targets[b]["labels"][t]
        expected = F.cross_entropy(logits[layer].transpose(1, 2), target, weight)
        assert losses[layer].item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- post-processing
def test_postprocess_keeps_every_query_with_its_best_real_class():
    logits = torch.tensor([[[0.0, 2.0, 5.0], [3.0, 1.0, 0.0]]])  # the first query's best logit is "no object"
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0]]])
    (result,) = DETRPostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    prob = logits[0].softmax(-1)
    assert result["labels"].tolist() == [1, 0]
    torch.testing.assert_close(result["scores"], torch.stack([prob[0, 1], prob[1, 0]]))
    torch.testing.assert_close(result["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 100.0, 100.0]]))


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_of_the_other_architecture_names_the_flag():
    detr, _, _ = build_model(parse("--meta_arch", "detr"))
    sam_detr, _, _ = build_model(parse())
    with pytest.raises(CheckpointMismatchError, match="holds a DETR model.*pass --meta_arch detr"):
        load_weights(sam_detr, detr.state_dict(), "detr.pth")
    with pytest.raises(CheckpointMismatchError, match="holds a SAM-DETR model.*pass --meta_arch sam_detr"):
        load_weights(detr, sam_detr.state_dict(), "sam_detr.pth")


def test_detr_class_count_mismatch_names_num_classes():
    detr, _, _ = build_model(parse("--meta_arch", "detr", "--num_classes", "5"))
    other, _, _ = build_model(parse("--meta_arch", "detr"))
    with pytest.raises(CheckpointMismatchError, match="--num_classes 5"):
        load_weights(other, detr.state_dict())


def test_official_detr_checkpoint_without_meta_arch_rebuilds_detr():
    """DETR's published checkpoints pickle its argparse flags, which predate --meta_arch: the demo
    and the exporter read the architecture off the weights."""
    import argparse

    from demo import stored_flags
    detr, _, _ = build_model(parse("--meta_arch", "detr"))
    official = {"model": detr.state_dict(), "args": argparse.Namespace(num_queries=100, hidden_dim=32)}
    assert stored_flags(official, official["model"])["meta_arch"] == "detr"
    ours = {"model": detr.state_dict(), "args": {"meta_arch": "sam_detr"}}  # a stored flag is kept as it is
    assert stored_flags(ours, ours["model"])["meta_arch"] == "sam_detr"
