"""The CPU's separable RoIAlign form against torchvision's RoIAlign and grid_sample.

SeparableRoIs must give the Semantics Aligner the same numbers as KernelRoIs (torchvision), in
values and gradients, on awkward boxes and sample points; the decoder must pick it only where
it is meant to.
"""
import pytest
import torch
from torch import nn

from main import get_args_parser
from models import build_model, roi
from models.code_path import gpu_code_path
from models.roi import KernelRoIs, SeparableRoIs, align_rois, use_separable

ROI_SIZE = 7
TOL = dict(rtol=1e-4, atol=1e-5)


def awkward_boxes(batch, height, width, generator):
    """(B, Q, 4) xyxy boxes in feature pixels: random ones, plus edge cases in every image."""
    cxcy = torch.rand(batch, 40, 2, generator=generator) * 1.2 - 0.1
    wh = torch.rand(batch, 40, 2, generator=generator)
    scale = torch.tensor([width, height, width, height], dtype=torch.float)
    boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1) * scale
    special = torch.tensor([
        [0.0, 0.0, width, height],                 # the whole map
        [2.0, 1.0, 2.0, 1.0],                      # zero size
        [-0.5, -0.5, 0.5, 0.5],                    # a pixel at the corner
        [width - 1.0, height - 1.0, width + 0.0, height + 0.0],  # the last pixel
        [1.0, 1.0, 1.0 + 7 / 3, 2.0 + 14 / 3],     # bins ending on pixel edges
        [-3.0, -2.5, width - 2.5, height - 3.0],   # as long as the map, shifted out
        [width - 0.5, 0.25, width + 0.5, 0.75],    # only half a pixel inside
    ])
    return torch.cat([boxes, special.expand(batch, -1, -1)], 1)


def maps(batch, channels, height, width, generator):
    memory = torch.randn(batch, height * width, channels, generator=generator, dtype=torch.float)
    memory_2d = memory.transpose(1, 2).reshape(batch, channels, height, width).contiguous()
    return memory, memory_2d


@pytest.mark.parametrize("height,width", [(6, 9), (9, 6), (12, 12), (3, 20)])
def test_separable_roi_align_equals_torchvision(height, width):
    gen = torch.Generator().manual_seed(height * width)
    memory, memory_2d = maps(2, 16, height, width, gen)
    boxes = awkward_boxes(2, height, width, gen)
    identity = nn.Conv2d(16, 16, 1, bias=False)
    nn.init.eye_(identity.weight.view(16, 16))
    want = KernelRoIs(memory_2d, boxes, ROI_SIZE).conv1x1(identity)
    got = SeparableRoIs(memory, height, width, boxes, ROI_SIZE).conv1x1(identity)
    assert got.shape == want.shape == (2 * boxes.shape[1], 16, ROI_SIZE, ROI_SIZE)
    torch.testing.assert_close(got, want, **TOL)
    assert want.flatten(1).abs().sum(1).eq(0).any()  # the zero-size box


def test_separable_reads_equal_the_kernels_in_values_and_gradients():
    """conv1x1 (with bias) and sample, as the decoder uses them, including sample points outside
    the RoI and points exactly on bin centres (where grid_sample's gradient picks a side)."""
    gen = torch.Generator().manual_seed(0)
    height, width, channels = 8, 11, 12
    memory, _ = maps(2, channels, height, width, gen)
    boxes = awkward_boxes(2, height, width, gen)
    q = boxes.shape[1]
    grid = torch.rand(2, q, 3, 2, generator=gen) * 2.4 - 1.2
    grid[:, :, 0] = 0.0                                  # the RoI's centre bin
    grid[:, :, 1] = torch.tensor([2 / 7 - 1e-7, -4 / 7])  # on bin centres
    conv = nn.Conv2d(channels, 5, 1)
    results = []
    for form in (KernelRoIs, SeparableRoIs):
        mem = memory.clone().requires_grad_()
        g = grid.clone().requires_grad_()
        conv.zero_grad()
        mem_2d = mem.transpose(1, 2).reshape(2, channels, height, width)
        rois = KernelRoIs(mem_2d, boxes, ROI_SIZE) if form is KernelRoIs else \
            SeparableRoIs(mem, height, width, boxes, ROI_SIZE)
        points = rois.conv1x1(conv)
        sampled = rois.sample(g)
        weights = torch.randn(points.shape, generator=torch.Generator().manual_seed(1))
        loss = (points.relu() * weights).sum() + (sampled * sampled.detach().sin()).sum()
        loss.backward()
        results.append((points, sampled, mem.grad, g.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, **TOL)
    assert results[0][3].abs().sum() > 0


def test_decoder_layers_agree_on_both_forms():
    """A whole small model, eval outputs and train gradients, kernel form against separable form."""
    args = get_args_parser().parse_args(["--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
                                         "--num_queries", "12", "--no_pretrained_backbone", "--device", "cpu",
                                         "--backbone", "resnet18", "--hidden_dim", "64", "--nheads", "4", "--smca",
                                         "--dropout", "0"])  # no dropout: both runs see the same net
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    for p in model.transformer.decoder.parameters():  # non-zero offsets: the points move off centre
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    images = [torch.randn(3, 160, 224), torch.randn(3, 128, 192)]
    runs = []
    for force_kernel in (True, False):
        model.zero_grad()
        if force_kernel:
            with gpu_code_path():
                out = model(images)
        else:
            out = model(images)
        (out["pred_logits"].sum() + out["pred_boxes"].square().sum()).backward()
        runs.append((out["pred_logits"], out["pred_boxes"],
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(runs[1][0], runs[0][0], **TOL)
    torch.testing.assert_close(runs[1][1], runs[0][1], **TOL)
    assert runs[0][2].keys() == runs[1][2].keys()
    for name, want in runs[0][2].items():
        torch.testing.assert_close(runs[1][2][name], want, rtol=1e-3, atol=1e-5, msg=name)


def test_the_separable_form_is_picked_only_where_meant():
    small = torch.zeros(1, 4, 8)
    assert use_separable(small, 4)
    assert not use_separable(small, roi.SEPARABLE_MAX_PIXELS_INFERENCE + 1)
    trained = small.clone().requires_grad_()
    assert use_separable(trained, roi.SEPARABLE_MAX_PIXELS_TRAINING)
    assert not use_separable(trained, roi.SEPARABLE_MAX_PIXELS_TRAINING + 1)
    with torch.no_grad():
        assert not use_separable(trained, roi.SEPARABLE_MAX_PIXELS_TRAINING)
    assert not use_separable(torch.zeros(1, 4, 8, device="meta"), 4)  # only CPU devices

    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    big = torch.zeros(1, 64 * 64, 8)
    big_2d = big.view(1, 8, 64, 64)

    def form(memory, memory_2d, choice="auto"):
        return type(align_rois(memory, memory_2d, boxes, ROI_SIZE, choice))
    assert form(small, small.view(1, 8, 2, 2)) is SeparableRoIs
    assert form(big, big_2d) is KernelRoIs
    assert form(big, big_2d, "separable") is SeparableRoIs
    assert form(small, small.view(1, 8, 2, 2), "kernel") is KernelRoIs
    with gpu_code_path():  # export, FLOP and op counting: always the kernel
        assert form(small, small.view(1, 8, 2, 2)) is KernelRoIs
        assert form(small, small.view(1, 8, 2, 2), "separable") is KernelRoIs
    with pytest.raises(ValueError, match="unknown RoI form"):
        form(small, small.view(1, 8, 2, 2), "fast")


def test_roi_align_flag_reaches_every_decoder_layer():
    flags = ["--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "4",
             "--no_pretrained_backbone", "--device", "cpu", "--backbone", "resnet18"]
    for choice in ("kernel", "separable"):
        model, _, _ = build_model(get_args_parser().parse_args(flags + ["--roi_align", choice]))
        assert [layer.roi_align for layer in model.transformer.decoder.layers] == [choice, choice]
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(flags + ["--roi_align", "fast"])


def test_separable_conv1x1_refuses_other_convolutions():
    rois = SeparableRoIs(torch.zeros(1, 4, 8), 2, 2, torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), ROI_SIZE)
    with pytest.raises(ValueError, match="1x1"):
        rois.conv1x1(nn.Conv2d(8, 4, 3, padding=1))


def test_non_finite_boxes_do_not_break_the_weights():
    """A diverged model's NaN or infinite boxes: no out-of-range scatter (NaN stays NaN, for the
    non-finite loss check to report), and the other boxes' weights are untouched."""
    memory = torch.randn(1, 6 * 8, 4)
    boxes = torch.tensor([[[float("nan"), 1.0, 3.0, 4.0], [0.0, float("inf"), 3.0, 4.0], [1.0, 1.0, 5.0, 4.0]]])
    rois = SeparableRoIs(memory, 6, 8, boxes, ROI_SIZE)
    alone = SeparableRoIs(memory, 6, 8, boxes[:, 2:], ROI_SIZE)
    assert torch.equal(rois.weights_x[:, 2:], alone.weights_x) and torch.equal(rois.weights_y[:, 2:], alone.weights_y)
    assert not rois.weights_x[0, 0].isfinite().all()
