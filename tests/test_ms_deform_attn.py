"""Multi-scale deformable attention: fast PyTorch path, CUDA kernels, module."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from models.ops import MSDeformAttn, extension_available, level_start_index, ms_deform_attn, ms_deform_attn_pytorch

# Small problem with levels of different sizes (including a 1 x 1 map).
SHAPES = [(6, 9), (3, 5), (2, 2), (1, 1)]
BATCH = 2
QUERIES = 7
HEADS = 3
CHANNELS = 5
POINTS = 2
# Locations are drawn from [-MARGIN, 1 + MARGIN]: a fair share of them fall
# partly or wholly off the map, where zero padding matters.
MARGIN = 0.3


def grid_sample_reference(value, spatial_shapes, sampling_locations, attention_weights):
    """Per-level ``F.grid_sample``; the definition the fast paths must match."""
    batch, _, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    out = value.new_zeros(batch, queries, heads, channels)
    token = 0
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        level_value = value[:, token:token + height * width]
        token += height * width
        for head in range(heads):
            image = level_value[:, :, head].reshape(batch, height, width, channels).permute(0, 3, 1, 2)
            grid = 2 * sampling_locations[:, :, head, level] - 1  # (N, Lq, P, 2)
            sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            weights = attention_weights[:, :, head, level]  # (N, Lq, P)
            out[:, :, head] += (sampled * weights[:, None]).sum(-1).transpose(1, 2)
    return out.flatten(2)


def make_inputs(dtype=torch.float64, device="cpu", shapes=SHAPES, batch=BATCH, queries=QUERIES, heads=HEADS,
                channels=CHANNELS, points=POINTS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    starts = level_start_index(spatial_shapes)
    tokens = int(spatial_shapes.prod(1).sum())
    levels = len(shapes)
    value = torch.randn(batch, tokens, heads, channels, generator=gen, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=torch.float64)
    locations = locations * (1 + 2 * MARGIN) - MARGIN
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (value, locations, weights)]
    return tensors[0], spatial_shapes.to(device), starts.to(device), tensors[1], tensors[2]


def value_and_grads(fn, value, spatial_shapes, level_start_index, locations, weights, grad_out):
    out = fn(value, spatial_shapes, level_start_index, locations, weights)
    grads = torch.autograd.grad(out, (value, locations, weights), grad_out)
    return (out,) + grads


def reference_fn(value, spatial_shapes, level_start_index, locations, weights):
    return grid_sample_reference(value, spatial_shapes, locations, weights)


# ----------------------------------------------------------------------------- PyTorch path


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_pytorch_path_matches_grid_sample(dtype, tol):
    inputs = make_inputs(dtype)
    grad_out = torch.randn(BATCH, QUERIES, HEADS * CHANNELS, dtype=dtype)
    expected = value_and_grads(reference_fn, *inputs, grad_out)
    actual = value_and_grads(ms_deform_attn_pytorch, *inputs, grad_out)
    for name, a, e in zip(("output", "grad value", "grad locations", "grad weights"), actual, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_pytorch_path_off_map_points_read_zero():
    value, shapes, starts, locations, weights = make_inputs()
    far = torch.tensor([[-0.6, 0.5], [1.7, 0.5], [0.5, -3.0], [0.5, 1e6], [float("inf"), 0.2]], dtype=torch.float64)
    locations = far.view(1, 1, 1, 1, -1, 2).expand(BATCH, QUERIES, HEADS, len(SHAPES), -1, 2).contiguous()
    locations.requires_grad_()
    weights = torch.ones(BATCH, QUERIES, HEADS, len(SHAPES), far.shape[0], dtype=torch.float64, requires_grad=True)
    out = ms_deform_attn_pytorch(value, shapes, starts, locations, weights)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (value, locations, weights))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_pytorch_path_gradcheck():
    inputs = make_inputs(shapes=[(3, 4), (2, 1)], batch=2, queries=3, heads=2, channels=2, points=2, seed=1)
    value, shapes, starts, locations, weights = inputs
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_pytorch(v, shapes, starts, loc, w),
        (value, locations, weights), eps=1e-6, atol=1e-5, rtol=1e-4,
    )


def test_pytorch_path_without_value_grad_and_noncontiguous_inputs():
    value, shapes, starts, locations, weights = make_inputs()
    value = value.detach()
    # A transposed copy viewed back: same values, non-contiguous strides.
    locations_nc = locations.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    grad_out = torch.randn(BATCH, QUERIES, HEADS * CHANNELS, dtype=torch.float64)
    out = ms_deform_attn_pytorch(value, shapes, starts, locations_nc, weights)
    grad_loc, grad_w = torch.autograd.grad(out, (locations_nc, weights), grad_out)
    expected = reference_fn(value, shapes, starts, locations.detach().requires_grad_(), weights)
    torch.testing.assert_close(out, expected)
    assert grad_loc.shape == locations.shape and grad_w.shape == weights.shape


def test_dispatch_on_cpu_uses_pytorch_path_without_warning():
    inputs = make_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, reference_fn(*inputs))


def test_autocast_cpu_bfloat16_runs_in_float32():
    value, shapes, starts, locations, weights = make_inputs(torch.float32)
    expected = reference_fn(value, shapes, starts, locations, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), shapes, starts, locations, weights.bfloat16())
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Only the bfloat16 rounding of the inputs separates the two.
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    out.sum().backward()
    assert torch.isfinite(locations.grad).all()


# ----------------------------------------------------------------------------- module


def test_module_parameter_names_and_shapes():
    d_model, levels, heads, points = 16, 3, 4, 2
    module = MSDeformAttn(d_model=d_model, n_levels=levels, n_heads=heads, n_points=points)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {
        "sampling_offsets.weight": (heads * levels * points * 2, d_model),
        "sampling_offsets.bias": (heads * levels * points * 2,),
        "attention_weights.weight": (heads * levels * points, d_model),
        "attention_weights.bias": (heads * levels * points,),
        "value_proj.weight": (d_model, d_model),
        "value_proj.bias": (d_model,),
        "output_proj.weight": (d_model, d_model),
        "output_proj.bias": (d_model,),
    }


def test_module_init():
    levels, heads, points = 2, 8, 3
    module = MSDeformAttn(d_model=32, n_levels=levels, n_heads=heads, n_points=points)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    assert torch.count_nonzero(module.attention_weights.bias) == 0
    assert torch.count_nonzero(module.value_proj.bias) == 0
    assert torch.count_nonzero(module.output_proj.bias) == 0
    bias = module.sampling_offsets.bias.detach().view(heads, levels, points, 2)
    for head in range(heads):
        angle = 2 * math.pi * head / heads
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for point in range(points):
            expected = (direction * (point + 1)).expand(levels, 2)
            torch.testing.assert_close(bias[head, :, point], expected)
    # Head 0 looks right, head 2 of 8 straight down; points step outwards.
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[2, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)


def test_module_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_levels=1, n_heads=8, n_points=1)


def _module_inputs(d_model, shapes, batch=2, queries=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    starts = level_start_index(spatial_shapes)
    tokens = int(spatial_shapes.prod(1).sum())
    query = torch.randn(batch, queries, d_model, generator=gen)
    reference = torch.rand(batch, queries, len(shapes), 2, generator=gen)
    features = torch.randn(batch, tokens, d_model, generator=gen)
    return query, reference, features, spatial_shapes, starts


def test_module_forward_matches_manual_computation():
    d_model, heads, points = 12, 3, 2
    shapes = [(4, 5), (2, 3)]
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=d_model, n_levels=len(shapes), n_heads=heads, n_points=points)
    with torch.no_grad():  # make offsets and attention depend on the query
        module.sampling_offsets.weight.normal_(std=0.5)
        module.attention_weights.weight.normal_()
    query, reference, features, spatial_shapes, starts = _module_inputs(d_model, shapes)
    out = module(query, reference, features, spatial_shapes, starts)
    assert out.shape == query.shape

    batch, queries, _ = query.shape
    value = module.value_proj(features).view(batch, -1, heads, d_model // heads)
    offsets = module.sampling_offsets(query).view(batch, queries, heads, len(shapes), points, 2)
    logits = module.attention_weights(query).view(batch, queries, heads, len(shapes) * points)
    weights = logits.softmax(-1).view(batch, queries, heads, len(shapes), points)
    wh = spatial_shapes.flip(-1).float()
    locations = reference[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    expected = module.output_proj(grid_sample_reference(value, spatial_shapes, locations, weights))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    boxes = torch.cat((reference, torch.full_like(reference, 0.25)), dim=-1)
    assert module(query, boxes, features, spatial_shapes, starts).shape == query.shape


def test_module_padding_mask_zeroes_masked_tokens():
    d_model = 8
    shapes = [(3, 4), (2, 2)]
    module = MSDeformAttn(d_model=d_model, n_levels=len(shapes), n_heads=2, n_points=2)
    query, reference, features, spatial_shapes, starts = _module_inputs(d_model, shapes)
    mask = torch.zeros(features.shape[:2], dtype=torch.bool)
    mask[0, 5:9] = True
    mask[1, -3:] = True
    out = module(query, reference, features, spatial_shapes, starts, mask)
    # Changing masked features must not change the output ...
    scrambled = features.clone()
    scrambled[mask] = torch.randn(int(mask.sum()), d_model) * 100
    torch.testing.assert_close(module(query, reference, scrambled, spatial_shapes, starts, mask), out)
    # ... and masking everything leaves only the output projection's bias.
    full = torch.ones_like(mask)
    out_all = module(query, reference, features, spatial_shapes, starts, full)
    torch.testing.assert_close(out_all, module.output_proj.bias.expand_as(out_all))


# ----------------------------------------------------------------------------- CUDA kernels

needs_cuda_extension = pytest.mark.skipif(
    not torch.cuda.is_available() or not extension_available(),
    reason="needs a CUDA device and the compiled extension (models/ops/make.sh)",
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pytorch_path_on_cuda_matches_cpu():
    cpu = make_inputs(torch.float64)
    gpu = [t.detach().cuda().requires_grad_(t.requires_grad) for t in cpu]
    grad_out = torch.randn(BATCH, QUERIES, HEADS * CHANNELS, dtype=torch.float64)
    expected = value_and_grads(ms_deform_attn_pytorch, *cpu, grad_out)
    actual = value_and_grads(ms_deform_attn_pytorch, *gpu, grad_out.cuda())
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e)


@needs_cuda_extension
def test_cuda_gradcheck_float64():
    inputs = make_inputs(device="cuda", shapes=[(3, 4), (2, 1)], queries=3, heads=2, channels=2, points=2, seed=1)
    value, shapes, starts, locations, weights = inputs
    # The value gradient is accumulated with atomics, so repeated backward
    # passes may differ in the last bits.
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, starts, loc, w),
        (value, locations, weights), eps=1e-6, atol=1e-5, rtol=1e-4, nondet_tol=1e-12,
    )


@needs_cuda_extension
@pytest.mark.parametrize("channels", [CHANNELS, 32, 40])
def test_cuda_float32_matches_pytorch_path(channels):
    cpu = make_inputs(torch.float32, channels=channels)
    gpu = [t.detach().cuda().requires_grad_(t.requires_grad) for t in cpu]
    grad_out = torch.randn(BATCH, QUERIES, HEADS * channels)
    expected = value_and_grads(ms_deform_attn_pytorch, *cpu, grad_out)
    actual = value_and_grads(ms_deform_attn, *gpu, grad_out.cuda())
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-4)


@needs_cuda_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision_matches_float32_on_rounded_inputs(dtype):
    # Compare with float32 applied to the same rounded inputs: what remains
    # is the rounding of the results, since the kernels accumulate in float32.
    rounded = [t.detach().to(dtype) if t.is_floating_point() else t for t in make_inputs(torch.float32, channels=32)]
    cpu = [(t.float() if t.is_floating_point() else t).requires_grad_(t.is_floating_point()) for t in rounded]
    gpu = [t.cuda().requires_grad_(t.is_floating_point()) for t in rounded]
    grad_out = torch.randn(BATCH, QUERIES, HEADS * 32).to(dtype)
    expected = value_and_grads(ms_deform_attn_pytorch, *cpu, grad_out.float())
    actual = value_and_grads(ms_deform_attn, *gpu, grad_out.cuda())
    tol = 1e-2 if dtype == torch.float16 else 2e-2
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        scale = e.abs().max().clamp(min=1)
        torch.testing.assert_close(a.float().cpu() / scale, e / scale, rtol=tol, atol=tol)


@needs_cuda_extension
def test_cuda_large_batch_matches_pytorch_path():
    cpu = make_inputs(torch.float32, shapes=[(20, 27), (10, 14), (5, 7)], batch=2, queries=300, heads=8,
                      channels=32, points=4)
    gpu = [t.detach().cuda().requires_grad_(t.requires_grad) for t in cpu]
    grad_out = torch.randn(2, 300, 8 * 32)
    expected = value_and_grads(ms_deform_attn_pytorch, *cpu, grad_out)
    actual = value_and_grads(ms_deform_attn, *gpu, grad_out.cuda())
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-3, atol=1e-3)
