"""RoIAlign for the Semantics Aligner, spread over the CPU threads one image at a time."""
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import Tensor
from torchvision.ops import roi_align

# sampling_ratio for ceil(box side / output side) points per bin and axis: torchvision reads any
# value <= 0 so, ONNX RoiAlign only 0
ADAPTIVE_SAMPLING = 0

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
