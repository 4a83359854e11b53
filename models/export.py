"""ONNX export of SAM-DETR and DETR, and the exported model run by onnxruntime.

The detector is traced by ``torch.export`` with a dynamic batch, height and width, then
translated by PyTorch's ONNX exporter (``torch.onnx.export(..., dynamo=True)``). Every op maps to
a standard ONNX op: RoIAlign to ``RoiAlign`` (half-pixel coordinates, adaptive sampling, as
torchvision's ``aligned=True``) and deformable attention to one ``GridSample`` per level (see
``models/ops/functional.py``); no custom op and no compiled extension is needed to run it.

Graph inputs: ``images`` (B, 3, H, W) float32, normalised as in evaluation, zero on padding, and
``mask`` (B, H, W) bool, True on padding (a NestedTensor's two fields). Outputs: ``pred_logits``
(B, Q, C) and ``pred_boxes`` (B, Q, 4), normalised cxcywh, as the PyTorch model returns them
(C = num_classes sigmoid logits for SAM-DETR, num_classes + 1 softmax logits for DETR, the last
one "no object"). With post-processing, a third input ``orig_sizes`` (B, 2) int64 of (height,
width) and the outputs ``scores`` (B, K), ``labels`` (B, K) int64 and ``boxes`` (B, K, 4) xyxy in
pixels of ``orig_sizes``, as the model's own post-processor computes them (``postprocessor_of``):
SAM-DETR's ``PostProcess``, the top K = min(100, Q * num_classes) (query, class) pairs, best
first; DETR's ``DETRPostProcess``, every query (K = Q) with its best real class, in query order.

The model's architecture flags can be stored in the file's metadata (``METADATA_KEY``, JSON),
so that a user of the file (``demo.py --onnx``) knows the image size and classes it expects, and
so can its category names (``CLASS_NAMES_KEY``, JSON {"id": name}), so that it labels its boxes
as the PyTorch demo does.
"""
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .code_path import gpu_code_path
from . import meta_arch_of, postprocessor

INPUT_NAMES = ("images", "mask")
SIZES_NAME = "orig_sizes"
OUTPUT_NAMES = ("pred_logits", "pred_boxes")
DETECTION_NAMES = ("scores", "labels", "boxes")
METADATA_KEY = "samdetr_args"
CLASS_NAMES_KEY = "samdetr_class_names"
# The opset of PyTorch's ONNX function library (so no version conversion runs); GridSample and
# RoiAlign's half_pixel mode need at least 16.
OPSET = 18
# The coarsest feature map (stride 32) must be at least 2 x 2: a 1-pixel map broadcasts
# differently, and the traced graph holds for sides from here up.
MAX_STRIDE = 32
MIN_SIDE = 2 * MAX_STRIDE
# The traced example: a batch of 2 (a batch of 1 would be traced as a constant), the second
# image padded at the bottom and right.
EXAMPLE_BATCH = 2
EXAMPLE_SIZE = (128, 160)
EXAMPLE_VALID = (96, 128)
# warns once per constant Split it leaves unfolded (harmless: onnxruntime folds or runs them)
CONSTANT_FOLDING_LOGGER = "onnxscript.optimizer._constant_folding"

def postprocessor_of(model: nn.Module) -> nn.Module:
    """The post-processor of `model`'s architecture."""
    return postprocessor(meta_arch_of(model))


class DetectorGraph(nn.Module):
    """The detector with plain tensor inputs and outputs: (images, mask) -> (logits, boxes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        """images (B, 3, H, W); mask (B, H, W) True on padding -> (B, Q, C) logits, (B, Q, 4) boxes."""
        out = self.model(NestedTensor(images, mask))
        return out["pred_logits"], out["pred_boxes"]


class DetectorGraphWithDetections(DetectorGraph):
    """The detector followed by its own post-processing: also the scores, labels and pixel boxes.

    post: anything with PostProcess's `batched(logits, boxes, target_sizes)`; by default the
    post-processor of the model's architecture (`postprocessor_of`).
    """

    def __init__(self, model: nn.Module, post: Optional[nn.Module] = None):
        super().__init__(model)
        self.postprocessor = post if post is not None else postprocessor_of(model)

    def forward(self, images: Tensor, mask: Tensor, orig_sizes: Tensor) -> Tuple[Tensor, ...]:
        """... and orig_sizes (B, 2) of (h, w) -> logits, boxes, scores (B, K), labels (B, K),
        boxes (B, K, 4) xyxy pixels (K: see the module docstring)."""
        logits, boxes = super().forward(images, mask)
        return (logits, boxes) + tuple(self.postprocessor.batched(logits, boxes, orig_sizes))


def example_inputs(postprocess: bool) -> Tuple[Tensor, ...]:
    """A padded batch to trace with (and to check the exported model on)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(EXAMPLE_BATCH, 3, *EXAMPLE_SIZE, generator=generator)
    mask = torch.zeros(EXAMPLE_BATCH, *EXAMPLE_SIZE, dtype=torch.bool)
    mask[1, EXAMPLE_VALID[0]:] = True
    mask[1, :, EXAMPLE_VALID[1]:] = True
    images.masked_fill_(mask[:, None], 0.0)
    if not postprocess:
        return images, mask
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return images, mask, torch.stack([valid_h, valid_w], 1)


def _dynamic_shapes(postprocess: bool) -> Dict[str, Dict[int, Any]]:
    batch = torch.export.Dim("batch")
    height = torch.export.Dim("height", min=MIN_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE)
    shapes = {"images": {0: batch, 2: height, 3: width}, "mask": {0: batch, 1: height, 2: width}}
    if postprocess:
        shapes[SIZES_NAME] = {0: batch}
    return shapes


def export_onnx(model: nn.Module, path: Union[str, Path], postprocess: bool = False,
                metadata: Optional[Mapping[str, Any]] = None, optimize: bool = True,
                class_names: Optional[Mapping[int, str]] = None) -> None:
    """Writes `model` (SAM-DETR or DETR, on the CPU, in eval mode) to `path` as ONNX, atomically.

    postprocess: also the detections of the model's own post-processor (`postprocessor_of`).
    metadata: JSON-serialisable flags stored under METADATA_KEY. class_names: category id -> name
    (a checkpoint's ``class_names``), stored under CLASS_NAMES_KEY when given and not empty.
    Raises torch.export's error when any of batch, height or width cannot stay dynamic: the file
    never holds a graph fixed to the example's shapes.
    """
    model = model.cpu().eval()
    graph = DetectorGraphWithDetections(model) if postprocess else DetectorGraph(model)
    inputs = example_inputs(postprocess)
    # no_grad: the inference graph (frozen BatchNorms folded, no autograd-only paths)
    # gpu_code_path: torchvision's RoIAlign, which becomes ONNX RoiAlign (not the CPU's matmul form)
    with torch.no_grad(), gpu_code_path():
        program = torch.export.export(graph, inputs, dynamic_shapes=_dynamic_shapes(postprocess), strict=False)
    names = OUTPUT_NAMES + (DETECTION_NAMES if postprocess else ())
    input_names = list(INPUT_NAMES) + ([SIZES_NAME] if postprocess else [])
    folding_log = logging.getLogger(CONSTANT_FOLDING_LOGGER)
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=input_names, output_names=list(names),
                                         opset_version=OPSET, optimize=optimize, verbose=False)
    finally:
        folding_log.setLevel(level)
    if metadata is not None:
        onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(dict(metadata))
    if class_names:
        onnx_program.model.metadata_props[CLASS_NAMES_KEY] = encode_class_names(class_names)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx_program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def encode_class_names(class_names: Mapping[int, str]) -> str:
    """id -> name as JSON (whose keys are strings), ids in increasing order."""
    return json.dumps({str(int(k)): str(v) for k, v in sorted(class_names.items(), key=lambda kv: int(kv[0]))})


def decode_class_names(text: str) -> Dict[int, str]:
    """The inverse of encode_class_names: integer ids again."""
    return {int(k): str(v) for k, v in json.loads(text).items()}


class OnnxRuntimeDetector:
    """An exported detector run by onnxruntime on the CPU, called like the PyTorch model.

    `detector(samples)` takes a NestedTensor or a list of (3, H, W) images and returns
    {"pred_logits", "pred_boxes"} as CPU tensors (and the detections when the file has them).
    `metadata` holds the stored architecture flags, `class_names` the stored category names
    (id -> name; {} when the file has none).
    """

    def __init__(self, path: Union[str, Path], threads: Optional[int] = None):
        import onnxruntime  # only needed here: the PyTorch model runs without it

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.input_names[: len(INPUT_NAMES)] != list(INPUT_NAMES):
            raise ValueError(f"{path}: inputs {self.input_names} are not those of a detector exported by "
                             f"tools/export_onnx.py ({', '.join(INPUT_NAMES)})")
        stored = self.session.get_modelmeta().custom_metadata_map
        self.metadata: Dict[str, Any] = json.loads(stored.get(METADATA_KEY, "{}"))
        self.class_names: Dict[int, str] = decode_class_names(stored.get(CLASS_NAMES_KEY, "{}"))

    @property
    def logits_per_query(self) -> Optional[int]:
        """C of the file's pred_logits (B, Q, C): num_classes (SAM-DETR) or num_classes + 1 (DETR);
        None when the file leaves it dynamic."""
        shape = self.session.get_outputs()[self.output_names.index(OUTPUT_NAMES[0])].shape
        return shape[-1] if isinstance(shape[-1], int) else None

    def run(self, images: Tensor, mask: Tensor, orig_sizes: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """images (B, 3, H, W); mask (B, H, W); orig_sizes (B, 2) when the file has post-processing."""
        feed = dict(zip(INPUT_NAMES, (images.detach().cpu().float().numpy(), mask.cpu().numpy())))
        if SIZES_NAME in self.input_names:
            if orig_sizes is None:
                raise ValueError(f"this model has post-processing: pass {SIZES_NAME} (B, 2) of (h, w)")
            feed[SIZES_NAME] = orig_sizes.cpu().long().numpy()
        outputs = self.session.run(None, feed)
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}

    def __call__(self, samples: Union[NestedTensor, Sequence[Tensor]]) -> Dict[str, Tensor]:
        """Post-processed boxes, when the file has them, are in pixels of the unpadded inputs."""
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(list(samples))
        if SIZES_NAME in self.input_names:
            valid = torch.stack([(~samples.mask[:, :, 0]).sum(1), (~samples.mask[:, 0, :]).sum(1)], 1)
            return self.run(samples.tensors, samples.mask, valid)
        return self.run(samples.tensors, samples.mask)
