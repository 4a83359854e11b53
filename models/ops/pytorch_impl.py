"""Pure-PyTorch multi-scale deformable attention.

Two implementations live here:

* :func:`ms_deform_attn_reference` -- one ``F.grid_sample`` call per feature
  level. Obviously correct, used as the yardstick in tests and benchmarks.
* :func:`ms_deform_attn_pytorch` -- the fast path used on CPU (and on GPU when
  the CUDA extension is missing).

How the fast path works. Bilinear sampling is linear in ``value``, so the op is
a sparse matrix product: output row ``(n, q, h)`` is a weighted sum of
``L * P * 4`` rows of a ``(rows, D)`` table. Each level's map is first copied
into a zero border (``_PAD`` pixels on every side), and sampling positions are
clamped into that border. Then every corner of every point is a valid row, the
corners that fall off the map simply read zeros, and the four corners of a
point sit at fixed offsets from its top-left row. This removes all validity
masks from both passes:

* forward: one ``F.embedding_bag`` over the ``(N*Lq*M, L*P*4)`` row indices
  with the corner weights ``attention * w_y * w_x`` as per-sample weights;
* backward (:class:`_SparseSamplingFunction`): the corner gradients
  ``<grad_out[bag], table[row]>`` give the attention and location gradients by
  the chain rule through the bilinear weights; the value gradient (the
  transposed product) buckets points by their top-left row, reduces the output
  gradient per bucket with one ``embedding_bag`` per corner and adds the four
  results at their corner offsets. That needs a sort of one key per point,
  whereas autograd's ``embedding_bag`` backward sorts one key per corner and is
  several times slower.

Shapes used throughout: ``N`` batch, ``S`` value tokens (``sum(H_l * W_l)``),
``M`` heads, ``D`` channels per head, ``Lq`` queries, ``L`` levels, ``P``
points per head and level.
"""

from __future__ import annotations

import warnings
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from util.misc import to_device_async

from .shapes import SpatialShapes, level_shapes, shapes_tensor

__all__ = ["ms_deform_attn_pytorch", "ms_deform_attn_reference"]

# Bilinear interpolation touches a 2 x 2 neighbourhood. Corners are ordered
# (dy, dx) = (0, 0), (0, 1), (1, 0), (1, 1), i.e. index = 2 * dy + dx.
_CORNERS_PER_AXIS = 2
_CORNERS = _CORNERS_PER_AXIS * _CORNERS_PER_AXIS
# Pixel centres sit at half-integers under align_corners=False.
_PIXEL_CENTRE = 0.5
# Zero border around every level. Positions are clamped to [-_PAD, size], so a
# clamped point has both corners in the border (zero value, zero gradient),
# exactly like a point that grid_sample finds entirely off the map.
_PAD = 2
# Elements of gathered table rows per chunk in the backward; small enough to
# stay in cache, large enough to keep the Python loop short.
_GATHER_CHUNK_ELEMENTS = 2**21
# Largest index that int32 index arithmetic may produce.
_INT32_LIMIT = 2**31 - 1


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Straightforward per-level ``grid_sample`` implementation.

    Args:
        value: ``(N, S, M, D)``.
        spatial_shapes: ``(L, 2)`` int64 rows of ``(H, W)``, or ``(H, W)`` pairs of ints.
        level_start_index: ``(L,)``; unused, the levels are split by their sizes.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``.
        attention_weights: ``(N, Lq, M, L, P)``.

    Returns:
        ``(N, Lq, M * D)``.
    """
    del level_start_index  # the split sizes carry the same information
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    per_level = value.split([height * width for height, width in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1].
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W): one image per (batch, head).
        image = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N*M, D, Lq, L, P) weighted by (N*M, 1, Lq, L, P), summed over L and P.
    stacked = torch.stack(sampled, dim=-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    output = (stacked * weights).sum(dim=(-1, -2))
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()


class _PaddedLayout:
    """Geometry of the zero-bordered copy of the value maps.

    Attributes:
        shapes: per-level ``(H, W)`` of the unpadded maps (Python ints).
        starts: per-level first token of the unpadded maps.
        padded_shapes: per-level ``(H + 2 * _PAD, W + 2 * _PAD)``.
        padded_starts: per-level first token in the padded table.
        padded_tokens: tokens per batch element in the padded table.
    """

    def __init__(self, spatial_shapes: SpatialShapes) -> None:
        self.shapes: List[Tuple[int, int]] = [(int(h), int(w)) for h, w in level_shapes(spatial_shapes)]
        self.starts: List[int] = [0]
        for height, width in self.shapes[:-1]:
            self.starts.append(self.starts[-1] + height * width)
        self.padded_shapes = [(h + 2 * _PAD, w + 2 * _PAD) for h, w in self.shapes]
        self.padded_starts: List[int] = []
        total = 0
        for height, width in self.padded_shapes:
            self.padded_starts.append(total)
            total += height * width
        self.padded_tokens = total

    def pad(self, value: Tensor) -> Tensor:
        """``(N, S, M, D)`` -> ``(N, padded_tokens, M, D)`` with zero borders."""
        batch, _, heads, channels = value.shape
        padded = value.new_zeros(batch, self.padded_tokens, heads, channels)
        for (height, width), start, (ph, pw), pstart in zip(
            self.shapes, self.starts, self.padded_shapes, self.padded_starts
        ):
            target = padded[:, pstart:pstart + ph * pw].view(batch, ph, pw, heads, channels)
            target[:, _PAD:_PAD + height, _PAD:_PAD + width] = value[:, start:start + height * width].view(
                batch, height, width, heads, channels
            )
        return padded


def _index_dtype(largest: int) -> torch.dtype:
    # int32 halves the memory traffic of the index arithmetic, a large share
    # of the run time; fall back to int64 for huge inputs.
    return torch.int32 if largest <= _INT32_LIMIT else torch.int64


class _SparseSamplingFunction(torch.autograd.Function):
    """Autograd function behind :func:`ms_deform_attn_pytorch` (see module doc).

    Inside a bag the ``L * P * 4`` samples are stored corner-major,
    ``(4, L, P)``: the order within a bag is free, and this one turns every
    per-corner step into an operation on contiguous ``(B, L, P)`` blocks
    instead of a broadcast over a trailing dimension of size 2 or 4.
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, shapes):
        # spatial_shapes: the (L, 2) tensor; shapes: the same sizes as a plain tuple of ints (last,
        # so that traced graphs keep the official input positions)
        batch, _, heads, channels = value.shape
        _, queries, _, levels, points, _ = sampling_locations.shape
        # Element-wise results inherit the input strides; the flat views below
        # need the standard layout.
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        layout = _PaddedLayout(shapes)
        num_rows = batch * layout.padded_tokens * heads
        index_dtype = _index_dtype(num_rows)
        device = value.device
        dtype = value.dtype
        bags = batch * queries * heads
        point_shape = (batch, queries, heads, levels, points)

        heights = spatial_shapes[:, 0].to(dtype).view(levels, 1)
        widths = spatial_shapes[:, 1].to(dtype).view(levels, 1)
        lower = torch.full_like(widths, -_PAD)
        frac, top_left = [], []
        for coordinate, size in ((sampling_locations[..., 0], widths), (sampling_locations[..., 1], heights)):
            pixel = coordinate * size - _PIXEL_CENTRE
            # Non-finite positions read zeros instead of producing garbage indices.
            pixel = torch.nan_to_num(pixel, nan=-_PAD, posinf=-_PAD, neginf=-_PAD)
            pixel = torch.clamp(pixel, min=lower, max=size)
            corner = pixel.floor()
            frac.append(pixel - corner)
            top_left.append(corner.to(index_dtype))
        frac_x, frac_y = frac
        left, top = top_left

        # Table row of the top-left corner:
        # (n * padded_tokens + padded_start + (y + PAD) * padded_W + x + PAD) * M + h.
        # (uploaded without making the host wait, as one table)
        np_index = np.int32 if index_dtype == torch.int32 else np.int64
        padded_width, padded_start = to_device_async(
            np.asarray([[w for _, w in layout.padded_shapes], layout.padded_starts], dtype=np_index), device)
        level_base = padded_start + _PAD * padded_width + _PAD
        base = (
            (torch.arange(batch, dtype=index_dtype, device=device).view(batch, 1, 1, 1) * layout.padded_tokens
             + level_base) * heads
            + torch.arange(heads, dtype=index_dtype, device=device).view(heads, 1)
        ).view(batch, 1, heads, levels, 1)
        row_stride = (padded_width * heads).view(levels, 1)
        top_left_row = (left * heads).add_(top * row_stride).add_(base)
        # Corner (dy, dx) sits dy padded rows and dx columns further on.
        corner_offsets = torch.stack(
            (torch.zeros_like(row_stride), torch.full_like(row_stride, heads), row_stride, row_stride + heads)
        )  # (4, L, 1)
        rows = (top_left_row.view(bags, 1, levels, points) + corner_offsets).view(bags, -1)

        weight_x = (1 - frac_x, frac_x)
        weight_y1 = frac_y * attention_weights
        weight_y = (attention_weights - weight_y1, weight_y1)
        corner_weights = value.new_empty(bags, _CORNERS, levels, points)
        for k in range(_CORNERS):
            dy, dx = divmod(k, _CORNERS_PER_AXIS)
            torch.mul(weight_y[dy].view(bags, levels, points), weight_x[dx].view(bags, levels, points),
                      out=corner_weights[:, k])
        corner_weights = corner_weights.view(bags, -1)

        table = layout.pad(value).view(num_rows, channels)
        output = F.embedding_bag(rows, table, per_sample_weights=corner_weights, mode="sum")

        ctx.layout = layout
        ctx.value_shape = value.shape
        ctx.point_shape = point_shape
        ctx.save_for_backward(table, rows, top_left_row, corner_weights, frac_x, frac_y, attention_weights,
                              spatial_shapes)
        return output.view(batch, queries, heads * channels)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (table, rows, top_left_row, corner_weights, frac_x, frac_y, attention_weights,
         spatial_shapes) = ctx.saved_tensors
        layout = ctx.layout
        channels = table.shape[1]
        levels = spatial_shapes.shape[0]
        grad_rows = grad_output.reshape(-1, channels).contiguous()

        grad_value = None
        if ctx.needs_input_grad[0]:
            grad_value = _transposed_sampling(grad_rows, ctx.value_shape, layout, top_left_row, corner_weights)

        grad_locations = grad_attention = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_corner = _corner_dot_products(grad_rows, table, rows)
            # Border corners read zeros, so their gradient is zero and no
            # masking is needed below. Corner k = 2 * dy + dx.
            g00, g01, g10, g11 = (
                grad_corner.view(grad_rows.shape[0], _CORNERS, -1)[:, k].view(ctx.point_shape)
                for k in range(_CORNERS)
            )
            # Sums along x for each dy, and along y for each dx.
            row0 = torch.lerp(g00, g01, frac_x)
            row1 = torch.lerp(g10, g11, frac_x)
            if ctx.needs_input_grad[4]:
                grad_attention = torch.lerp(row0, row1, frac_y)
            if ctx.needs_input_grad[3]:
                col0 = torch.lerp(g00, g10, frac_y)
                col1 = torch.lerp(g01, g11, frac_y)
                dtype = grad_corner.dtype
                # d/dfrac of the bilinear weights, then the chain rule through
                # pixel = location * size - 0.5 (the clamp only acts where all
                # corners are border, i.e. where the gradient is already zero).
                widths = spatial_shapes[:, 1].to(dtype).view(levels, 1)
                heights = spatial_shapes[:, 0].to(dtype).view(levels, 1)
                grad_x = col1.sub_(col0).mul_(attention_weights).mul_(widths)
                grad_y = row1.sub_(row0).mul_(attention_weights).mul_(heights)
                grad_locations = torch.stack((grad_x, grad_y), dim=-1)
        return grad_value, None, None, grad_locations, grad_attention, None


def _corner_dot_products(grad_rows: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """``out[b, k] = <grad_rows[b], table[rows[b, k]]>``.

    On CPU this is a sampled dense-dense product (``torch.sparse.sampled_addmm``
    with the sampling pattern given by ``rows``), which computes the dot
    products without materialising the gathered rows. Elsewhere the rows are
    gathered in cache-sized chunks and reduced with a batched matmul.

    Args:
        grad_rows: ``(B, D)``.
        table: ``(R, D)``.
        rows: ``(B, K)`` integer indices into ``table``.

    Returns:
        ``(B, K)``.
    """
    bags, samples = rows.shape
    channels = table.shape[1]
    if grad_rows.device.type == "cpu":
        crow = torch.arange(0, bags * samples + 1, samples, dtype=rows.dtype)
        with warnings.catch_warnings():
            # Sparse CSR support is flagged as beta; the warning is noise here.
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                crow, rows.reshape(-1), grad_rows.new_zeros(bags * samples), size=(bags, table.shape[0]),
                check_invariants=False,
            )
            sampled = torch.sparse.sampled_addmm(pattern, grad_rows, table.t(), beta=0.0)
        return sampled.values().view(bags, samples)
    out = grad_rows.new_empty(bags, samples, 1)
    chunk = max(1, _GATHER_CHUNK_ELEMENTS // max(1, samples * channels))
    for begin in range(0, bags, chunk):
        end = min(bags, begin + chunk)
        gathered = F.embedding(rows[begin:end], table)  # (chunk, K, D)
        torch.bmm(gathered, grad_rows[begin:end, :, None], out=out[begin:end])
    return out.view(bags, samples)


def _transposed_sampling(grad_rows: Tensor, value_shape, layout: _PaddedLayout, top_left_row: Tensor,
                         corner_weights: Tensor) -> Tensor:
    """Gradient of ``value``: the transposed sampling matrix times ``grad_rows``.

    Args:
        grad_rows: ``(N*Lq*M, D)`` output gradient.
        value_shape: ``(N, S, M, D)``.
        layout: padded geometry of the forward.
        top_left_row: ``(N, Lq, M, L, P)`` padded-table row of each point's
            top-left corner.
        corner_weights: ``(N*Lq*M, 4*L*P)`` per-corner weights of the forward,
            corner-major inside each bag.

    Returns:
        ``(N, S, M, D)``.
    """
    batch, tokens, heads, channels = value_shape
    points_per_bag = corner_weights.shape[1] // _CORNERS
    num_rows = batch * layout.padded_tokens * heads
    device = grad_rows.device

    sorted_rows, order = torch.sort(top_left_row.reshape(-1))
    counts = torch.bincount(sorted_rows, minlength=num_rows)
    offsets = torch.zeros(num_rows + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    source_bag = torch.div(order, points_per_bag, rounding_mode="floor")
    # Point p = bag * points_per_bag + j has its corner-k weight at flat
    # position bag * 4 * points_per_bag + k * points_per_bag + j.
    weight_index = source_bag * ((_CORNERS - 1) * points_per_bag) + order
    flat_weights = corner_weights.reshape(-1)
    sorted_weights = [flat_weights.index_select(0, weight_index + k * points_per_bag) for k in range(_CORNERS)]

    # Tokens outside every level (there should be none) get zero gradient.
    tiled = layout.starts == [sum(h * w for h, w in layout.shapes[:i]) for i in range(len(layout.shapes))]
    covers_all = tiled and sum(h * w for h, w in layout.shapes) == tokens
    grad_value = (grad_rows.new_empty if covers_all else grad_rows.new_zeros)(batch, tokens, heads, channels)
    # by_corner[k][r]: share of padded row r's points destined for corner k.
    by_corner = [
        F.embedding_bag(source_bag, grad_rows, offsets, per_sample_weights=sorted_weights[k],
                        mode="sum", include_last_offset=True).view(batch, layout.padded_tokens, heads, channels)
        for k in range(_CORNERS)
    ]
    for (height, width), start, (ph, pw), pstart in zip(
        layout.shapes, layout.starts, layout.padded_shapes, layout.padded_starts
    ):
        target = grad_value[:, start:start + height * width].view(batch, height, width, heads, channels)
        for k, grad in enumerate(by_corner):
            dy, dx = divmod(k, _CORNERS_PER_AXIS)
            padded = grad[:, pstart:pstart + ph * pw].view(batch, ph, pw, heads, channels)
            # Map pixel (y, x) is corner (dy, dx) of the point whose top-left
            # corner is (y - dy, x - dx), i.e. padded (y - dy + PAD, x - dx + PAD).
            window = padded[:, _PAD - dy:_PAD - dy + height, _PAD - dx:_PAD - dx + width]
            if k == 0:
                target.copy_(window)
            else:
                target.add_(window)
    return grad_value


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Fast pure-PyTorch multi-scale deformable attention.

    Matches :func:`ms_deform_attn_reference` (bilinear ``grid_sample`` with zero
    padding and ``align_corners=False``) in value and gradient.

    Args:
        value: ``(N, S, M, D)``.
        spatial_shapes: ``(L, 2)`` int64 rows of ``(H, W)``.
        level_start_index: ``(L,)`` int64 first token of every level.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``;
            points outside ``[0, 1]`` read zeros.
        attention_weights: ``(N, Lq, M, L, P)``.

    Returns:
        ``(N, Lq, M * D)`` in ``value.dtype``. Half and bfloat16 inputs are
        computed in float32 and cast back.
    """
    out_dtype = value.dtype
    compute_dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype
    )
    if compute_dtype in (torch.float16, torch.bfloat16):
        compute_dtype = torch.float32
    batch, _, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    if value.numel() == 0 or sampling_locations.numel() == 0:
        # Keep the autograd connection so callers still get (zero) gradients.
        zero = (value.sum() + sampling_locations.sum() + attention_weights.sum()) * 0
        return zero.expand(batch, queries, heads * channels).to(out_dtype)
    output = _SparseSamplingFunction.apply(
        value.to(compute_dtype),
        shapes_tensor(spatial_shapes, value.device),
        level_start_index,
        sampling_locations.to(compute_dtype),
        attention_weights.to(compute_dtype),
        tuple(level_shapes(spatial_shapes)),
    )
    return output.to(out_dtype)
