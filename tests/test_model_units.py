"""Unit tests of the model's parts: matcher, box ops, padding, configurable sizes, devices."""
import itertools
import re
from pathlib import Path

import pytest
import torch
import torchvision

from main import get_args_parser
from models import build_model
from models.matcher import HungarianMatcher, pack_targets
from models.transformer import decoder_levels
from util.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou, paired_giou_loss
from util.misc import nested_tensor_from_tensor_list

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "12",
         "--no_pretrained_backbone", "--device", "cpu"]


def small_args(*extra):
    return get_args_parser().parse_args(SMALL + list(extra))


def random_boxes(n, generator):
    """(n, 4) valid normalised cxcywh boxes."""
    cxcy = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([cxcy, wh], 1)


# ----------------------------------------------------------------------------- matcher
def naive_cost(logits, boxes, labels, tgt_boxes, weights):
    """The matching cost written out entry by entry."""
    alpha, gamma = 0.25, 2.0
    cost = torch.zeros(len(logits), len(labels), dtype=torch.float64)
    for i, j in itertools.product(range(len(logits)), range(len(labels))):
        p = logits[i, labels[j]].double().sigmoid()
        cls = alpha * (1 - p) ** gamma * -(p + 1e-8).log() - (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
        l1 = (boxes[i] - tgt_boxes[j]).abs().sum()
        a, b = box_cxcywh_to_xyxy(boxes[i]).double(), box_cxcywh_to_xyxy(tgt_boxes[j]).double()
        inter = (torch.min(a[2:], b[2:]) - torch.max(a[:2], b[:2])).clamp(min=0).prod()
        union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
        hull = (torch.max(a[2:], b[2:]) - torch.min(a[:2], b[:2])).prod()
        giou = inter / union - (hull - union) / hull
        cost[i, j] = weights[0] * cls + weights[1] * l1 - weights[2] * giou
    return cost


def brute_force_min(cost):
    """Minimal total cost over every injective map of targets to predictions."""
    q, t = cost.shape
    return min(sum(cost[p, j] for j, p in enumerate(perm)) for perm in itertools.permutations(range(q), t))


@pytest.mark.parametrize("num_targets", [[0, 2], [3, 1], [0, 0], [4, 4]])
def test_matcher_equals_brute_force(num_targets):
    gen = torch.Generator().manual_seed(sum(num_targets))
    batch, queries, classes = len(num_targets), 5, 7
    weights = (2.0, 5.0, 2.0)
    outputs = {"pred_logits": torch.randn(batch, queries, classes, generator=gen),
               "pred_boxes": torch.stack([random_boxes(queries, gen) for _ in range(batch)])}
    targets = [{"labels": torch.randint(0, classes, (n,), generator=gen), "boxes": random_boxes(n, gen)}
               for n in num_targets]
    matcher = HungarianMatcher(*weights)
    indices = matcher(outputs, targets)
    for b, ((rows, cols), t) in enumerate(zip(indices, targets)):
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(queries, len(t["labels"]))
        if len(t["labels"]) == 0:
            continue
        assert len(set(rows.tolist())) == len(rows) and sorted(cols.tolist()) == list(range(len(cols)))
        cost = naive_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], t["labels"], t["boxes"], weights)
        assert cost[rows, cols].sum().item() == pytest.approx(brute_force_min(cost).item(), rel=1e-5, abs=1e-5)


def test_matcher_cost_matrix_entries():
    gen = torch.Generator().manual_seed(3)
    outputs = {"pred_logits": torch.randn(1, 4, 5, generator=gen), "pred_boxes": random_boxes(4, gen)[None]}
    targets = [{"labels": torch.tensor([1, 4]), "boxes": random_boxes(2, gen)}]
    ours = HungarianMatcher(2.0, 5.0, 2.0).cost_matrices(outputs["pred_logits"], outputs["pred_boxes"],
                                                         pack_targets(targets))[0, :, :2]
    naive = naive_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"],
                       targets[0]["boxes"], (2.0, 5.0, 2.0))
    torch.testing.assert_close(ours.double(), naive, rtol=1e-5, atol=1e-5)


def test_matcher_rejects_all_zero_costs():
    with pytest.raises(ValueError, match="all matching costs"):
        HungarianMatcher(0, 0, 0)


# ----------------------------------------------------------------------------- box ops
def test_box_conversions_match_torchvision():
    gen = torch.Generator().manual_seed(0)
    boxes = random_boxes(20, gen)
    xyxy = box_cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(xyxy, torchvision.ops.box_convert(boxes, "cxcywh", "xyxy"))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), boxes)
    manual = torch.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2,
                          boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2], 1)
    torch.testing.assert_close(xyxy, manual)


def test_paired_giou_equals_diagonal_of_matrix():
    gen = torch.Generator().manual_seed(1)
    a, b = box_cxcywh_to_xyxy(random_boxes(16, gen)), box_cxcywh_to_xyxy(random_boxes(16, gen))
    b[0] = a[0]  # identical pair: GIoU 1
    b[1] = a[1] + 5  # far apart: negative GIoU
    expected = 1 - torch.diag(generalized_box_iou(a, b))
    torch.testing.assert_close(paired_giou_loss(a, b), expected, rtol=1e-5, atol=1e-5)
    assert paired_giou_loss(a[:1], b[:1]).item() == pytest.approx(0.0, abs=1e-6)
    assert paired_giou_loss(a[1:2], b[1:2]).item() > 1.0


# ----------------------------------------------------------------------------- padding
def pad_level(src, mask_shape, generator):
    """Places (1, C, h, w) features at the top left of a (1, C, H, W) map filled with noise."""
    padded = torch.randn(1, src.shape[1], *mask_shape, generator=generator) * 10
    padded[..., : src.shape[-2], : src.shape[-1]] = src
    mask = torch.ones(1, *mask_shape, dtype=torch.bool)
    mask[:, : src.shape[-2], : src.shape[-1]] = False
    return padded, mask


@pytest.mark.parametrize("flags", [[], ["--smca"], ["--smca", "--multiscale"]])
def test_padding_does_not_change_an_image_after_the_backbone(flags):
    """Whatever the padded region holds, an image's decoder outputs equal those it gets alone.

    This is what the masks promise: the encoder ignores padded keys, position encodings and
    RoIAlign boxes follow the valid region, SMCA and the deformable encoder mask padding. (A
    whole model is not padding-invariant, here as in the official code: the ResNet's
    convolutions see the padding next to the image border, and so does a GroupNorm in
    input_proj; so the test starts after them.) Reference boxes are kept inside the image so
    that RoIAlign's bilinear samples do not straddle the border.
    """
    torch.manual_seed(0)
    model, _, _ = build_model(small_args("--dec_layers", "3", *flags))
    model.eval()
    with torch.no_grad():
        model.query_embed.weight.uniform_(-0.5, 0.5)
        model.query_embed.weight[:, 2:] = -2.0  # small boxes: sigmoid(-2) = 0.12 of the image
    gen = torch.Generator().manual_seed(1)
    d_model = model.transformer.d_model
    shapes = [(16, 20), (8, 10), (4, 5)] if "--multiscale" in flags else [(6, 7)]
    padded_shapes = [(24, 32), (12, 16), (6, 8)] if "--multiscale" in flags else [(9, 11)]
    srcs = [torch.randn(1, d_model, *s, generator=gen) for s in shapes]
    padded = [pad_level(s, p, gen) for s, p in zip(srcs, padded_shapes)]

    def decode(feats, masks):
        pos = [model.backbone[1](m) for m in masks]
        with torch.no_grad():
            return model.transformer(feats, masks, pos, model.query_embed.weight)

    alone = decode(srcs, [torch.zeros(1, *s, dtype=torch.bool) for s in shapes])
    batched = decode([p for p, _ in padded], [m for _, m in padded])
    for name in ("hidden", "references", "box_deltas"):
        torch.testing.assert_close(getattr(batched, name), getattr(alone, name), rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_list_tensor_and_nested_inputs_agree():
    torch.manual_seed(0)
    model, _, _ = build_model(small_args())
    model.eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 64)]
    with torch.no_grad():
        a = model(images)
        b = model(nested_tensor_from_tensor_list(images))
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])


@pytest.mark.parametrize("divisibility, expected", [(1, (80, 96)), (32, (96, 96)), (64, (128, 128))])
def test_size_divisibility_rounds_the_padded_batch_up(divisibility, expected):
    images = [torch.rand(3, 64, 96), torch.rand(3, 80, 64)]
    samples = nested_tensor_from_tensor_list(images, divisibility)
    assert tuple(samples.tensors.shape[-2:]) == expected
    for image, padded, mask in zip(images, samples.tensors, samples.mask):
        h, w = image.shape[1:]
        assert torch.equal(padded[:, :h, :w], image)
        assert not mask[:h, :w].any() and mask.sum() == mask.numel() - h * w
        assert not padded.any(dim=0)[mask].any()
    with pytest.raises(ValueError, match="size_divisibility"):
        nested_tensor_from_tensor_list(images, 0)


# ----------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("flags", [
    ["--hidden_dim", "64", "--nheads", "2"],
    ["--hidden_dim", "128", "--nheads", "4", "--smca"],
    ["--hidden_dim", "64", "--nheads", "4", "--smca", "--multiscale", "--dec_layers", "3"],
    ["--hidden_dim", "256", "--nheads", "16", "--epochs", "12"],
])
def test_other_widths_and_head_counts_train(flags):
    torch.manual_seed(0)
    model, criterion, _ = build_model(small_args(*flags))
    out = model([torch.randn(3, 64, 96), torch.randn(3, 96, 64)])
    q, classes = model.query_embed.num_embeddings, model.class_embed[0].out_features
    assert out["pred_logits"].shape == (2, q, classes) and out["pred_boxes"].shape == (2, q, 4)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.4, 0.6, 0.5, 0.2]])}]
    losses = criterion(out, targets)
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("flags, message", [
    (["--hidden_dim", "96", "--nheads", "5"], "divisible by nheads"),
    (["--hidden_dim", "48", "--nheads", "4", "--epochs", "12"], "GroupNorm"),
])
def test_unsupported_sizes_fail_clearly(flags, message):
    with pytest.raises(ValueError, match=message):
        build_model(small_args(*flags))


def test_decoder_level_map_is_official():
    assert decoder_levels(6, 3) == [2, 2, 1, 1, 0, 0]
    assert decoder_levels(6, 1) == [0] * 6
    assert decoder_levels(3, 3) == [2, 1, 0]


def test_backbone_freezing_follows_lr_backbone():
    model, _, _ = build_model(small_args())
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".layer2." in n or ".layer3." in n or ".layer4." in n for n in trainable)
    frozen_model, _, _ = build_model(small_args("--lr_backbone", "0"))
    assert not any(p.requires_grad for p in frozen_model.backbone.parameters())


def test_backbone_norm_batch_trains_every_stage_and_updates_running_stats():
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model(small_args())[0].modules())
    torch.manual_seed(0)
    model, criterion, _ = build_model(small_args("--hidden_dim", "64", "--nheads", "4", "--backbone_norm", "batch"))
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(p.requires_grad for p in model.backbone.parameters())
    before = [n.running_mean.clone() for n in norms]
    out = model([torch.randn(3, 64, 96), torch.randn(3, 96, 64)])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.5, 0.2]])}]
    losses = criterion(out, targets)
    sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.parameters())
    assert all(not torch.equal(b, n.running_mean) for b, n in zip(before, norms))


# ----------------------------------------------------------------------------- devices
def test_no_hard_coded_cuda_calls():
    offenders = []
    for path in [REPO / "main.py", REPO / "engine.py", *REPO.glob("models/**/*.py"), *REPO.glob("util/*.py"),
                 *REPO.glob("datasets/*.py")]:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.cuda\(\)|device=[\"']cuda[\"']", line):
                offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, "hard-coded CUDA:\n" + "\n".join(offenders)


class CountingConv(torch.nn.Conv2d):
    """A replaced convolution, as a researcher's change would bring: counts its calls."""
    calls = 0

    def forward(self, x):
        CountingConv.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_backbone_calls_a_replaced_convolution_with_the_same_numbers(training):
    """The folded fast form steps aside for a convolution that is not a plain nn.Conv2d."""
    from models.backbone import build_backbone
    args = small_args("--backbone", "resnet18")
    torch.manual_seed(0)
    body = build_backbone(args)[0].body
    x = torch.randn(1, 3, 64, 96)
    body.train(training)
    with torch.set_grad_enabled(training):
        expected = body(x)[-1]
        plain = body.layer3[0].conv1
        replaced = CountingConv(plain.in_channels, plain.out_channels, plain.kernel_size, plain.stride,
                                plain.padding, bias=False)
        replaced.load_state_dict(plain.state_dict())
        body.layer3[0].conv1 = replaced
        CountingConv.calls = 0
        actual = body(x)[-1]
    assert CountingConv.calls == 1
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags", [[], ["--meta_arch", "detr"], ["--backbone_norm", "batch"], ["--multiscale"]])
def test_every_gradient_has_the_strides_of_its_parameter(flags):
    """DDP's contract: a gradient whose strides differ from its parameter's is copied into the bucket
    at every step (with a warning). The 1x1 convolutions over channels-last maps are the case."""
    args = small_args(*flags)
    from models import apply_meta_arch_defaults
    apply_meta_arch_defaults(args)
    model, _, _ = build_model(args)
    outputs = model(nested_tensor_from_tensor_list([torch.rand(3, 96, 128), torch.rand(3, 112, 100)]))
    (outputs["pred_logits"].sum() + outputs["pred_boxes"].sum()).backward()
    differ = [(name, p.stride(), p.grad.stride()) for name, p in model.named_parameters()
              if p.grad is not None and p.grad.stride() != p.stride()]
    assert not differ


def test_half_precision_cross_attention_scales_before_the_product():
    """Under --amp fp16 the logits q.k of SAM-DETR's cross-attention (one query per head of full model
    width) would be rounded, and overflow fp16, at sqrt(d) = 16 times their size without the scale."""
    from models.attention import shared_key_attention
    torch.manual_seed(0)
    d = 256
    q = torch.randn(1, 2, 3, d) * 30
    k = torch.randn(1, 5, d) * 30
    k[0, 0] = q[0, 0, 0]  # a key that matches a query: q.k = |q|^2, about 230,000 (fp16 ends at 65,504)
    v = torch.randn(1, 2, 5, 4)
    assert (q.half().reshape(6, d) @ k.half()[0].T).isinf().any()  # unscaled, the logits overflow fp16
    reference = shared_key_attention(q, k, v, None, 0.0)
    half = shared_key_attention(q.half(), k.half(), v.half(), None, 0.0)
    assert half.isfinite().all()
    torch.testing.assert_close(half.float(), reference, atol=0.2, rtol=0)  # fp16 rounding of logits in the thousands
    bias = torch.zeros(1, 1, 1, 5)  # the float32-bias path (padding mask, SMCA prior)
    torch.testing.assert_close(shared_key_attention(q.half(), k.half(), v.half(), bias, 0.0).float(), reference,
                               atol=0.2, rtol=0)
