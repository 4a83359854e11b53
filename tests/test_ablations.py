"""The Semantics Aligner's ablation switches (--no_sam, --sam_resample, --sam_points,
--no_sam_reweight, --sam_search): each does what it names, builds exactly the modules it needs,
trains every parameter, refuses impossible combinations by name, and is rebuilt from checkpoints.
"""
import pytest
import torch
from torch import nn
from torchvision.ops import roi_align as torchvision_roi_align

import main
from e2e import TINY
from models import build_model
from models.decoder import ROI_SIZE, XY, AlignerOptions, SAMDecoderLayer, make_feature_map
from util.box_ops import box_cxcywh_to_xyxy

D_MODEL, HEADS, QUERIES, BATCH = 64, 4, 12, 2
HEIGHT, WIDTH = 9, 11
PADDED_COLUMNS = 3  # image 1 is narrower than the batch's map: its valid ratio is below 1
ALIGNER_MODULES = ("point1", "point2", "attn1", "attn2")


def make_layer(smca=False, roi_align="kernel", **options) -> SAMDecoderLayer:
    torch.manual_seed(0)
    layer = SAMDecoderLayer(D_MODEL, HEADS, 2 * D_MODEL, 0.0, smca, roi_align, AlignerOptions(**options))
    if hasattr(layer, "point2"):
        # the official init leaves the offsets at 0 (every point at the box centre): spread them
        nn.init.normal_(layer.point2[-1].weight, std=0.5)
        nn.init.normal_(layer.point2[-1].bias, std=1.0)
    return layer.eval()


def make_inputs():
    """A FeatureMap with padding on image 1, reference boxes (B, Q, 4) cxcywh and tgt / query_pos."""
    torch.manual_seed(1)
    memory = torch.randn(BATCH, HEIGHT * WIDTH, D_MODEL)
    pos = torch.randn(BATCH, HEIGHT * WIDTH, D_MODEL)
    mask = torch.zeros(BATCH, HEIGHT, WIDTH, dtype=torch.bool)
    mask[1, :, WIDTH - PADDED_COLUMNS:] = True
    level = make_feature_map(memory, pos, mask)
    centres = torch.rand(BATCH, QUERIES, XY) * 0.5 + 0.25
    sizes = torch.rand(BATCH, QUERIES, XY) * 0.2 + 0.1  # small boxes: points of the image search leave them
    boxes = torch.cat([centres, sizes], -1)
    return level, boxes, torch.randn(BATCH, QUERIES, D_MODEL), torch.randn(BATCH, QUERIES, D_MODEL)


def inside(points, boxes, eps=1e-6):
    """(B, Q, P) whether each point (B, Q, P, 2) lies in its box (B, Q, 4) cxcywh."""
    xyxy = box_cxcywh_to_xyxy(boxes)[:, :, None]
    return ((points >= xyxy[..., :XY] - eps) & (points <= xyxy[..., XY:] + eps)).all(-1)


@pytest.mark.parametrize("roi_align", ["kernel", "separable"])
def test_box_search_keeps_points_in_the_box_image_search_does_not(roi_align):
    level, boxes, _, _ = make_inputs()
    with torch.no_grad():
        _, box_points, _ = make_layer(roi_align=roi_align)._align(level, boxes)
        features, image_points, _ = make_layer(roi_align=roi_align, search="image")._align(level, boxes)
    assert inside(box_points, boxes).all()
    assert not inside(image_points, boxes).all()
    assert ((image_points >= 0) & (image_points <= 1)).all()
    # the image search samples the whole map (bilinear, pixel centres at i + 0.5, image = unpadded part)
    b, q, h = 1, 5, 2
    valid_w, valid_h = level.valid_ratio[b].tolist()
    x = image_points[b, q, h, 0].item() * WIDTH * valid_w - 0.5
    y = image_points[b, q, h, 1].item() * HEIGHT * valid_h - 0.5
    x0, y0 = int(torch.tensor(x).floor()), int(torch.tensor(y).floor())
    fx, fy = x - x0, y - y0
    grid = level.memory_2d[b]

    def at(r, c):
        return grid[:, r, c] if 0 <= r < HEIGHT and 0 <= c < WIDTH else torch.zeros(D_MODEL)

    expected = ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
                + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))
    torch.testing.assert_close(features[b, q, h], expected, atol=1e-5, rtol=1e-5)


def _query_content(layer, level, boxes, tgt, query_pos):
    """What ca_qcontent_proj receives in a forward, and the aligner's resampled features."""
    seen = []
    handle = layer.ca_qcontent_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        layer(tgt, level, boxes, query_pos)
        content, _, _ = layer._align(level, boxes)
    handle.remove()
    return seen[0], content


def test_without_reweighting_the_query_is_the_resampled_feature_itself():
    level, boxes, tgt, query_pos = make_inputs()
    plain = make_layer(reweight=False)
    assert not hasattr(plain, "attn1") and not hasattr(plain, "attn2")
    query_content, content = _query_content(plain, level, boxes, tgt, query_pos)
    torch.testing.assert_close(query_content, content, rtol=0, atol=0)
    gated_content, content = _query_content(make_layer(), level, boxes, tgt, query_pos)
    assert not torch.allclose(gated_content, content)  # the official layer gates it


@pytest.mark.parametrize("roi_align", ["kernel", "separable"])
@pytest.mark.parametrize("mode", ["avgpool", "maxpool"])
def test_pooled_resampling_is_the_mean_or_max_of_torchvision_roi_align(mode, roi_align):
    level, boxes, _, _ = make_inputs()
    layer = make_layer(roi_align=roi_align, resample=mode)
    assert not hasattr(layer, "point1") and not hasattr(layer, "point2")
    with torch.no_grad():
        content, points, scales = layer._align(level, boxes)
    xyxy = (box_cxcywh_to_xyxy(boxes) * level.box_scale).flatten(0, 1)
    rois = torch.cat([torch.arange(BATCH).repeat_interleave(QUERIES)[:, None].float(), xyxy], 1)
    aligned = torchvision_roi_align(level.memory_2d, rois, ROI_SIZE, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    reference = aligned.mean((-2, -1)) if mode == "avgpool" else aligned.amax((-2, -1))
    for head in range(HEADS):
        torch.testing.assert_close(content[:, :, head].flatten(0, 1), reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(points[:, :, head], boxes[..., :XY])  # at the box centre
    assert scales is None


def test_fewer_salient_points_each_serve_a_run_of_heads():
    level, boxes, _, _ = make_inputs()
    layer = make_layer(points=2)
    assert layer.point2[-1].out_features == 2 * XY
    with torch.no_grad():
        content, points, _ = layer._align(level, boxes)
    for first, second in ((0, 1), (2, 3)):
        torch.testing.assert_close(points[:, :, first], points[:, :, second], rtol=0, atol=0)
        torch.testing.assert_close(content[:, :, first], content[:, :, second], rtol=0, atol=0)
    assert not torch.allclose(points[:, :, 0], points[:, :, 2])
    with torch.no_grad():
        _, one_point, _ = make_layer(points=1)._align(level, boxes)
    assert (one_point == one_point[:, :, :1]).all()


def test_no_sam_attends_with_content_and_box_centre_embedding():
    level, boxes, tgt, query_pos = make_inputs()
    layer = make_layer(enabled=False)
    for name in ALIGNER_MODULES:
        assert not hasattr(layer, name)
    seen = {}
    layer.ca_qcontent_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("content", args[0]))
    layer.ca_qpos_sine_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("pos", args[0]))
    with torch.no_grad():
        out = layer(tgt, level, boxes, query_pos)
    assert out.shape == tgt.shape
    # self-attention's output (before the cross-attention) and the box centre's sine embedding
    with torch.no_grad():
        torch.testing.assert_close(seen["content"], layer._self_attention(tgt, query_pos))
    torch.testing.assert_close(seen["pos"], query_pos, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# whole models: parameters, gradients, refusals
# ------------------------------------------------------------------------------------------
def build(*flags):
    args = main.get_args_parser().parse_args(TINY + list(flags))
    main.check_args(args)
    torch.manual_seed(0)
    return build_model(args)


def aligner_params(model, names):
    return sum(p.numel() for n, p in model.named_parameters() if any(f".{m}." in n for m in names))


@pytest.mark.parametrize("flags, removed", [
    (["--no_sam"], ALIGNER_MODULES),
    (["--sam_resample", "avgpool"], ("point1", "point2")),
    (["--sam_resample", "maxpool"], ("point1", "point2")),
    (["--no_sam_reweight"], ("attn1", "attn2")),
    (["--sam_search", "image"], ()),
])
def test_parameter_count_is_the_official_minus_the_removed_modules(flags, removed):
    official, _, _ = build()
    variant, _, _ = build(*flags)
    count = sum(p.numel() for p in official.parameters())
    assert sum(p.numel() for p in variant.parameters()) == count - aligner_params(official, removed)
    assert not any(any(f".{m}." in n for m in removed) for n, _ in variant.named_parameters())


@pytest.mark.parametrize("smca", [False, True])
def test_fewer_points_remove_exactly_their_rows_of_point2(smca):
    smca_flags = ["--smca"] if smca else []
    official, _, _ = build(*smca_flags)
    variant, _, _ = build("--sam_points", "1", *smca_flags)
    last = official.transformer.decoder.layers[0].point2[-1]
    per_point = XY * (2 if smca else 1) * (last.in_features + 1)  # weight rows and biases per point
    layers = len(official.transformer.decoder.layers)
    removed = layers * (HEADS - 1) * per_point
    assert (sum(p.numel() for p in variant.parameters())
            == sum(p.numel() for p in official.parameters()) - removed)


@pytest.mark.parametrize("flags", [
    ["--no_sam"], ["--no_sam", "--multiscale"], ["--sam_resample", "avgpool"], ["--sam_resample", "maxpool"],
    ["--sam_points", "1"], ["--sam_points", "2", "--smca"], ["--no_sam_reweight", "--smca"],
    ["--sam_search", "image", "--smca", "--multiscale"],
    ["--sam_points", "2", "--no_sam_reweight", "--dilation", "--backbone", "resnet50"],
])
def test_every_trainable_parameter_gets_a_gradient(flags):
    """So DDP needs no find_unused_parameters in any variant."""
    model, criterion, _ = build(*flags)
    model.train()
    torch.manual_seed(2)
    images = [torch.rand(3, 96, 128), torch.rand(3, 112, 96)]
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.2], [0.7, 0.6, 0.2, 0.3]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    losses = criterion(model(images), targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("flags, named", [
    (["--sam_points", "3"], "--sam_points 3 must divide --nheads 4"),
    (["--sam_points", "0"], "--sam_points 0 must divide --nheads 4"),
    (["--no_sam", "--smca"], "--smca"),
    (["--no_sam", "--sam_points", "2"], "--sam_points configures the Semantics Aligner, which --no_sam removes"),
    (["--no_sam", "--no_sam_reweight", "--sam_search", "image"], "--no_sam_reweight, --sam_search configure"),
    (["--sam_resample", "avgpool", "--smca"], "which --sam_resample avgpool replaces"),
    (["--sam_resample", "maxpool", "--sam_points", "2"], "--sam_points needs salient points"),
    (["--sam_resample", "maxpool", "--sam_search", "image"], "--sam_search needs salient points"),
    (["--meta_arch", "detr", "--no_sam"], "--no_sam mean nothing for --meta_arch detr"),
    (["--meta_arch", "detr", "--sam_points", "2"], "--sam_points mean nothing for --meta_arch detr"),
])
def test_impossible_combinations_are_refused_by_name(flags, named):
    with pytest.raises(SystemExit, match=named):
        main.check_args(main.get_args_parser().parse_args(TINY + flags))


def test_the_module_refuses_them_too():
    with pytest.raises(ValueError, match="--sam_points 3 must divide --nheads 4"):
        SAMDecoderLayer(D_MODEL, HEADS, D_MODEL, 0.0, False, aligner=AlignerOptions(points=3))


def test_every_variant_is_the_official_model_by_default():
    """Defaults: the official module set (parity is held by tests/test_parity.py)."""
    args = main.get_args_parser().parse_args(TINY)
    assert (args.no_sam, args.sam_resample, args.sam_points, args.no_sam_reweight, args.sam_search) == (
        False, "salient", None, False, "box")
    model, _, _ = build()
    layer = model.transformer.decoder.layers[0]
    assert all(hasattr(layer, m) for m in ALIGNER_MODULES) and layer.point2[-1].out_features == HEADS * XY
