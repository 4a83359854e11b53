"""RoIAlign for the Semantics Aligner: torchvision's kernel, or on the CPU a separable form.

The Semantics Aligner reads its RoI features twice: a 1x1 convolution (`point1`) and bilinear
samples at one point per head (grid_sample). Both are linear in the feature map, and RoIAlign's
weights factor into one matrix per axis (each sample's bilinear weight is a product of a row and a
column weight, and the samples of a bin form a grid). So on small maps both reads can skip the
(B*Q, C, 7, 7) RoI tensor: the convolution commutes with RoIAlign, and a head's sample is a
(H, W) outer product of per-axis weights applied to the map by one batched matmul. On the CPU,
where torchvision's RoIAlign runs on one thread and its backward dominates a training step, this
is several times faster; the numbers agree up to float rounding (tests/test_roi.py).
"""
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from .code_path import cpu_form, gpu_ops_forced

# sampling_ratio for ceil(box side / output side) points per bin and axis: torchvision reads any
# value <= 0 so, ONNX RoiAlign only 0
ADAPTIVE_SAMPLING = 0

# torchvision's aligned=True: box edges in pixel coordinates, pixel centres at i + 0.5
ALIGNED_OFFSET = 0.5
# Largest feature map (H * W) on which the separable form is the one used on the CPU. Measured
# on one thread, 300 queries of width 256: the separable form's matmuls grow with the map, the
# kernel's sampling with the boxes. Inference breaks even near 1,000 pixels with boxes of a
# tenth of the map's side, and is 2.5x faster with boxes of half its side; 1,536 covers a
# single-scale map of an 800 x 1333 image (25 x 42). Training gains more, as torchvision's
# backward is slow: 2.9x at 3,072 pixels with large boxes, even at 4,096 with small ones.
SEPARABLE_MAX_PIXELS_INFERENCE = 1536
SEPARABLE_MAX_PIXELS_TRAINING = 4096
# how the decoder reads its RoIs: auto (`use_separable` decides), or always one form
ROI_FORMS = ("auto", "kernel", "separable")

_pool: Optional[ThreadPoolExecutor] = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix="roi_align")
    return _pool


def _align(features: Tensor, boxes: Tensor, output_size: int) -> Tensor:
    """torchvision RoIAlign (aligned, spatial scale 1, adaptive sampling) with per-image boxes.

    features (B, C, H, W); boxes (B, Q, 4) -> (B*Q, C, S, S). The (B*Q, 5) RoI table (image
    index, box) is built in two ops rather than torchvision's per-image list conversion.
    """
    b, q, _ = boxes.shape
    image = torch.arange(b, device=boxes.device, dtype=boxes.dtype)[:, None, None].expand(b, q, 1)
    rois = torch.cat([image, boxes], -1).flatten(0, 1)
    return roi_align(features, rois, output_size=output_size, spatial_scale=1.0,
                     sampling_ratio=ADAPTIVE_SAMPLING, aligned=True)


def _align_per_image(features: Tensor, boxes: Tensor, output_size: int) -> Tensor:
    images = _executor().map(lambda b: _align(features[b:b + 1], boxes[b:b + 1], output_size),
                             range(features.shape[0]))
    return torch.cat(list(images))


class _PerImageRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign, forward and backward run one image per thread.

    torchvision's CPU kernels are single-threaded and, with hundreds of queries per image, the
    backward dominates a training step. The boxes of image b only read image b, so per-image
    results are disjoint slices of the whole: running them concurrently gives exactly the same
    numbers (the GIL is released inside the op).
    """

    @staticmethod
    def forward(ctx, features: Tensor, boxes: Tensor, output_size: int) -> Tensor:
        ctx.save_for_backward(features, boxes)
        ctx.output_size = output_size
        return _align_per_image(features, boxes, output_size)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        features, boxes = ctx.saved_tensors
        queries = boxes.shape[1]

        def image_grad(b: int) -> Tensor:
            with torch.enable_grad():
                image = features[b:b + 1].detach().requires_grad_()
                out = _align(image, boxes[b:b + 1], ctx.output_size)
                return torch.autograd.grad(out, image, grad_output[b * queries:(b + 1) * queries])[0]

        return torch.cat(list(_executor().map(image_grad, range(features.shape[0])))), None, None


def roi_align_boxes(features: Tensor, boxes: Tensor, output_size: int) -> Tensor:
    """features (B, C, H, W); boxes (B, Q, 4) xyxy in feature pixels -> (B*Q, C, S, S).

    When training on a multi-threaded CPU the images are aligned concurrently, forward and
    backward. (Inference keeps the plain call: the worker threads' own allocator arenas would
    raise its peak memory more than the concurrency saves.)
    """
    # (a thread pool cannot be traced by torch.compile, which gets the plain call)
    parallel = (not torch.compiler.is_compiling() and features.device.type == "cpu" and features.shape[0] > 1
                and torch.get_num_threads() > 1 and features.requires_grad and torch.is_grad_enabled())
    if parallel:
        return _PerImageRoIAlign.apply(features, boxes.detach(), output_size)
    return _align(features, boxes, output_size)


def use_separable(memory: Tensor, pixels: int) -> bool:
    """The choice of form "auto": the separable one on the CPU for maps of up to a few thousand
    `pixels` (= H * W), where it is the faster (never inside gpu_code_path() or an export)."""
    if not cpu_form(memory):
        return False
    training = memory.requires_grad and torch.is_grad_enabled()
    return pixels <= (SEPARABLE_MAX_PIXELS_TRAINING if training else SEPARABLE_MAX_PIXELS_INFERENCE)


def axis_weights(start: Tensor, end: Tensor, size: int, bins: int) -> Tensor:
    """RoIAlign along one axis as a matrix: start, end (N,) box edges in feature pixels -> (N, bins, size).

    Row p averages the bilinear weights of bin p's ceil((end - start) / bins) sample points, as
    torchvision's roi_align with aligned=True and adaptive sampling places them: samples beyond
    half a pixel outside the map count as zero, the others are clamped to it. The box may be at
    most `size` long (true of any box inside the image), which bounds the samples per bin.
    """
    start = start - ALIGNED_OFFSET
    length = end - ALIGNED_OFFSET - start
    step = length / bins
    samples = torch.ceil(step)
    # ceil(length / bins) <= size // bins + 1 for length <= size (float rounding included); one
    # more keeps the axis longer than 1, so a traced graph does not specialise on broadcasting
    max_samples = size // bins + 2
    bin_start = start[:, None] + torch.arange(bins, device=start.device, dtype=start.dtype) * step[:, None]
    index = torch.arange(max_samples, device=start.device, dtype=start.dtype) + 0.5
    pos = bin_start[:, :, None] + index * (step / samples.clamp(min=1))[:, None, None]  # (N, bins, max_samples)
    used = (index < samples[:, None, None]) & (pos >= -1.0) & (pos <= size)
    # a NaN box (a diverged model) gives unused samples; the index must still be a valid one
    pos = pos.nan_to_num(nan=0.0).clamp(min=0)
    low = pos.floor().clamp(max=size - 1)
    frac = (pos - low) * (low < size - 1)  # from the last pixel on, a sample is that pixel
    high = (low + 1).clamp(max=size - 1)
    scale = used / samples.clamp(min=1)[:, None, None]
    weights = torch.zeros(start.shape[0], bins, size, device=start.device, dtype=start.dtype)
    weights.scatter_add_(2, low.long(), (1 - frac) * scale)
    return weights.scatter_add_(2, high.long(), frac * scale)


def grid_weights(coords: Tensor, size: int) -> Tensor:
    """grid_sample along one axis as weights: coords (...,) in [-1, 1] -> (..., size).

    The bilinear weights of align_corners=False with zero padding; differentiable in `coords`
    (through the fractional part) as grid_sample's gradient is.
    """
    pos = ((coords + 1) * size - 1) / 2
    low = pos.floor()
    frac = (pos - low)[..., None]
    cells = torch.arange(size, device=coords.device, dtype=coords.dtype)
    low = low[..., None]
    return (cells == low) * (1 - frac) + (cells == low + 1) * frac


def pool(rois: Tensor, mode: str) -> Tensor:
    """(N, C, S, S) -> (N, C): the mean ("avgpool") or max ("maxpool") of each RoI's S x S features."""
    if mode == "avgpool":
        return rois.mean((-2, -1))
    if mode == "maxpool":
        return rois.amax((-2, -1))
    raise ValueError(f"pooling must be avgpool or maxpool, got {mode!r}")


class KernelRoIs:
    """RoI features made by torchvision's RoIAlign: rois (B*Q, C, S, S)."""

    fast_conv = False  # conv1x1 runs the convolution on the RoI tensor itself

    def __init__(self, memory_2d: Tensor, boxes: Tensor, output_size: int):
        """memory_2d (B, C, H, W); boxes (B, Q, 4) xyxy in feature pixels."""
        self.rois = roi_align_boxes(memory_2d, boxes, output_size)

    def tensor(self) -> Tensor:
        """The RoI features (B*Q, C, S, S)."""
        return self.rois

    def conv1x1(self, conv: nn.Conv2d) -> Tensor:
        """conv applied to the RoIs -> (B*Q, C', S, S)."""
        return conv(self.rois)

    def sample(self, grid: Tensor) -> Tensor:
        """Bilinear samples of each RoI: grid (B, Q, P, 2) xy in [-1, 1] -> (B, Q, P, C)."""
        b, q, p, _ = grid.shape
        sampled = F.grid_sample(self.rois, grid.view(b * q, 1, p, 2), padding_mode="zeros", align_corners=False)
        return sampled.view(b, q, -1, p).transpose(2, 3)


class SeparableRoIs:
    """The same reads as KernelRoIs, from the map and per-axis RoIAlign weights (see the module doc)."""

    fast_conv = True  # conv1x1 convolves the map, never making the RoI tensor

    def __init__(self, memory: Tensor, height: int, width: int, boxes: Tensor, output_size: int):
        """memory (B, H*W, C); boxes (B, Q, 4) xyxy in feature pixels (no gradient reaches them,
        as through torchvision's RoIAlign)."""
        self.memory, self.height, self.width = memory, height, width
        b, q, _ = boxes.shape
        boxes = boxes.detach().flatten(0, 1)
        self.weights_y = axis_weights(boxes[:, 1], boxes[:, 3], height, output_size).view(b, q, output_size, height)
        self.weights_x = axis_weights(boxes[:, 0], boxes[:, 2], width, output_size).view(b, q, output_size, width)

    def conv1x1(self, conv: nn.Conv2d) -> Tensor:
        """conv applied to the RoIs -> (B*Q, C', S, S), computed as RoIAlign of the convolved map
        (a strided view of channel-last data)."""
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.padding != (0, 0):
            raise ValueError(f"SeparableRoIs.conv1x1 takes a plain 1x1 convolution, got {conv}")
        b = self.memory.shape[0]
        mapped = F.linear(self.memory, conv.weight.flatten(1)).view(b, self.height, self.width, -1)
        out = self._align(mapped)
        if conv.bias is not None:
            out = out + conv.bias[:, None, None]
        return out.flatten(0, 1)

    def tensor(self) -> Tensor:
        """The RoI features (B*Q, C, S, S), made in full (the plain path for any other module)."""
        b, _, c = self.memory.shape
        return self._align(self.memory.view(b, self.height, self.width, c)).flatten(0, 1)

    def sample(self, grid: Tensor) -> Tensor:
        """grid (B, Q, P, 2) xy in [-1, 1] -> (B, Q, P, C): each point's weights over the map are
        an outer product of (grid_sample weights @ RoIAlign weights) per axis."""
        size = self.weights_y.shape[2]
        along_y = grid_weights(grid[..., 1], size) @ self.weights_y  # (B, Q, P, H)
        along_x = grid_weights(grid[..., 0], size) @ self.weights_x  # (B, Q, P, W)
        b, q, p, _ = grid.shape
        kernel = (along_y[..., :, None] * along_x[..., None, :]).view(b, q * p, self.height * self.width)
        return torch.bmm(kernel, self.memory).view(b, q, p, -1)

    def _align(self, mapped: Tensor) -> Tensor:
        """RoIAlign of mapped (B, H, W, C) -> (B, Q, C, S, S), a view of (B, Q, S_x, S_y, C) data.

        Columns first: the intermediate (B, Q, S, H, C) is the smaller one for the usual
        landscape image. (One fixed order: a choice by shape would recompile under torch.compile.)
        The second contraction is one small matmul per RoI and bin column."""
        b, h, w, c = mapped.shape
        q, s = self.weights_x.shape[1], self.weights_x.shape[2]
        columns = mapped.transpose(1, 2).reshape(b, w, h * c)
        partial = torch.bmm(self.weights_x.flatten(1, 2), columns).view(b, q, s, h, c)
        return torch.matmul(self.weights_y.unsqueeze(2), partial).permute(0, 1, 4, 3, 2)


def align_rois(memory: Tensor, memory_2d: Tensor, boxes: Tensor, output_size: int,
               form: str = "auto") -> Union[KernelRoIs, SeparableRoIs]:
    """RoIs of boxes (B, Q, 4) xyxy in feature pixels on a map given as memory (B, H*W, C) and
    memory_2d (B, C, H, W), in `form` (one of ROI_FORMS; inside gpu_code_path() and in an export
    always the kernel)."""
    height, width = memory_2d.shape[-2:]
    if gpu_ops_forced():
        form = "kernel"
    elif form == "auto":
        form = "separable" if use_separable(memory, height * width) else "kernel"
    if form == "separable":
        return SeparableRoIs(memory, height, width, boxes, output_size)
    if form == "kernel":
        return KernelRoIs(memory_2d, boxes, output_size)
    raise ValueError(f"unknown RoI form {form!r}, expected one of {ROI_FORMS}")

