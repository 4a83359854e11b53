"""Run a trained SAM-DETR or DETR checkpoint on image files and draw its detections.

Example:
    python demo.py --resume output/checkpoint.pth --images photos/ street.jpg \\
        --output_dir demo_out --threshold 0.5

Inputs: every ``--images`` entry is a file (opened whatever its extension) or a folder, from
which the .jpg/.jpeg/.png files (any letter case) are taken in sorted order; sub-folders are
searched only with ``--recursive``.

Outputs, in ``--output_dir``: ``<name>_det<ext>`` for every image (boxes, class names and scores
drawn; ``_1``, ``_2``, ... is appended when two inputs share a name) and ``detections.json``, a
list of ``{"image", "output", "width", "height", "detections": [{"label", "name", "score",
"box_xyxy"}]}`` with boxes in pixels of the original image (clipped to it), score >= threshold,
best first. Scores are those of the model's post-processor: for SAM-DETR (--meta_arch sam_detr)
the sigmoid score of each of the top 100 (query, class) pairs; for DETR (--meta_arch detr) the
softmax probability of each query's best real class (one detection per query, "no object"
left out), so the same threshold keeps different numbers of boxes for the two.

Model flags: as in main.py and tools/export_onnx.py, the resume policy of util/resume.py applies:
the model flags stored in the checkpoint (``util.resume.MODEL_FLAGS``; official checkpoints store
them too) are used unless given on the command line, so they need not be repeated. ``meta_arch``
is one of them, so a DETR checkpoint written by main.py rebuilds DETR; flags that neither the
checkpoint nor the command line set (such as --num_queries) then take that architecture's
defaults. A flag given on the command line always wins over the checkpoint, even when its value
equals the default. Run flags (--device, --resume, --output_dir, ...) are never taken from the
checkpoint. The image size (--val_size, --max_size) and --apply_exif count as model flags: by
default the demo sees images at the size the run was evaluated at, turned upright by their EXIF
tag only if the training images were (as the official loader, the stored bitmap is read otherwise).

Speed flags, as in main.py's evaluation: ``--amp bf16|fp16`` runs the model under autocast
(bf16 or fp16 on CUDA, bf16 on CPUs with bfloat16 units; otherwise float32, with main.py's note, see
engine.cpu_has_bf16) and post-processes its outputs in
float32; ``--compile`` calls the model compiled by main.compile_model; ``--size_divisibility N``
pads each image to multiples of N pixels (mask set on the padding), as the data loader pads.

ONNX: with ``--onnx MODEL.onnx`` (written by ``tools/export_onnx.py``) instead of ``--resume``,
the same demo runs through onnxruntime on the CPU and writes the same files; the model flags and
the class names are read from the file's metadata instead of a checkpoint (``meta_arch`` picks
the post-processor: ``models.postprocessor``; a file whose logits do not fit --meta_arch
and --num_classes is refused). ``--amp`` and ``--compile`` do not apply (onnxruntime runs the file
in float32) and are refused; ``--size_divisibility`` applies.

Class names: from the ``categories`` of a COCO annotation file given with ``--ann``; else those
main.py stored in the checkpoint (``class_names``: the categories of the training annotation
file), or that tools/export_onnx.py copied from it into the ONNX file; else the COCO names when
the model has 91 classes; else ``class <id>``.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from PIL import Image, ImageDraw, ImageFont

import engine
from datasets.coco import load_image
from datasets.coco_categories import COCO_CATEGORY_NAMES, COCO_CLASS_ROWS
from datasets.transforms import make_coco_transforms
from main import check_args, compile_model, get_args_parser
from models import CheckpointMismatchError, build_model, load_weights, postprocessor
from models.detr import NO_OBJECT_LOGITS
from models.export import OnnxRuntimeDetector
from models.meta_arch import meta_arch
from models.sam_detr import default_num_classes
from util.checkpoint import load_checkpoint
from util.misc import nested_tensor_from_tensor_list
from util.resume import adopt_model_flags, given_flags, stored_flags, taken_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_THRESHOLD = 0.5
OUTPUT_TAG = "_det"
JSON_NAME = "detections.json"
JPEG_QUALITY = 95

# what the ONNX model cannot do: onnxruntime runs the exported float32 graph as it is
ONNX_REFUSED_FLAGS = ("amp", "compile")

# Readable on photos: saturated, mutually distinct (Tableau 10).
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))

COCO_NUM_CLASSES = COCO_CLASS_ROWS
COCO_NAMES = COCO_CATEGORY_NAMES

Detection = Dict[str, Any]


# --------------------------------------------------------------------------------------------
# Command line and flags
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """All model flags of main.py plus the demo's own."""
    parser = argparse.ArgumentParser("SAM-DETR / DETR demo", parents=[get_args_parser()],
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--recursive", action="store_true", help="also search sub-folders of --images folders")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="keep detections with score >= this (SAM-DETR: sigmoid class score; DETR: "
                             "softmax probability of the query's best real class)")
    parser.add_argument("--ann", default="", help="COCO annotation json whose 'categories' name the classes")
    parser.add_argument("--onnx", default="", help="run this exported model (tools/export_onnx.py) with "
                                                   "onnxruntime on the CPU instead of a --resume checkpoint")
    return parser


def resolve_device(requested: Optional[str]) -> torch.device:
    """--device, defaulting to cuda when available; a clear error when cuda is asked for but absent."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was requested but CUDA is not available; use --device cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# Inputs and class names
# --------------------------------------------------------------------------------------------
def list_images(paths: Iterable[str], recursive: bool) -> List[Path]:
    """Files as given, plus the .jpg/.jpeg/.png files in folders (sorted; sub-folders if recursive)."""
    images: List[Path] = []
    for entry in map(Path, paths):
        if entry.is_file():
            images.append(entry)
        elif entry.is_dir():
            candidates = entry.rglob("*") if recursive else entry.iterdir()
            found = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                print(f"warning: no {'/'.join(IMAGE_SUFFIXES)} files in folder {entry}"
                      f"{'' if recursive else ' (sub-folders need --recursive)'}")
            images.extend(found)
        else:
            raise SystemExit(f"--images: {entry} is neither a file nor a folder")
    if not images:
        raise SystemExit(f"--images {' '.join(map(str, paths))}: no images found")
    return images


def load_class_names(ann_path: str, num_classes: int, stored: Optional[Mapping[int, str]] = None) -> Dict[int, str]:
    """id -> name from a COCO annotation file, else the checkpoint's ``stored`` names, else COCO
    names for 91-class models, else {}."""
    if ann_path:
        try:
            with open(ann_path) as f:
                categories = json.load(f)["categories"]
            return {int(c["id"]): str(c["name"]) for c in categories}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"--ann {ann_path}: cannot read category names "
                             f"(need a COCO json with 'categories': [{{'id', 'name'}}]): {error!r}") from error
    if stored:
        return {int(k): str(v) for k, v in stored.items()}
    return dict(COCO_NAMES) if num_classes == COCO_NUM_CLASSES else {}


def class_name(names: Mapping[int, str], label: int) -> str:
    """The category name, or 'class <id>' for ids without one (COCO gaps, unnamed datasets)."""
    return names.get(label, f"class {label}")


# --------------------------------------------------------------------------------------------
# Model and weights
# --------------------------------------------------------------------------------------------
def load_checkpoint_weights(model: torch.nn.Module, ckpt_state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load; a mismatch stops the demo with the flags to fix."""
    try:
        load_weights(model, ckpt_state, source)
    except CheckpointMismatchError as e:
        raise SystemExit(str(e)) from None


def expected_logits(args: argparse.Namespace) -> int:
    """Logits per query of the model of ``args``: num_classes, plus DETR's "no object" one."""
    return default_num_classes(args) + (NO_OBJECT_LOGITS if meta_arch(args) == "detr" else 0)


def check_onnx_logits(detector: OnnxRuntimeDetector, args: argparse.Namespace) -> None:
    """Stops when the ONNX file's logits do not fit --meta_arch and --num_classes: its detections
    would go through the wrong post-processor (e.g. a flag on the command line contradicts the file)."""
    width, expected = detector.logits_per_query, expected_logits(args)
    if width is not None and width != expected:
        raise SystemExit(f"the ONNX file's pred_logits have {width} values per query, but --meta_arch "
                         f"{meta_arch(args)} with --num_classes {default_num_classes(args)} has {expected}: leave "
                         f"--meta_arch and --num_classes to the file's metadata (or give the values it was "
                         f"exported with)")


def model_state_from(ckpt: Mapping[str, Any], source: str) -> Mapping[str, torch.Tensor]:
    """The state dict under 'model' (our and the official checkpoint layout)."""
    if "model" not in ckpt:
        raise SystemExit(f"{source} has no 'model' entry; keys: {sorted(ckpt)}")
    return ckpt["model"]


# --------------------------------------------------------------------------------------------
# Inference and drawing
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
def detect(model: torch.nn.Module, postprocess: torch.nn.Module, image: Image.Image, transform,
           device: torch.device, threshold: float, amp: Optional[str] = None,
           size_divisibility: int = 1) -> List[Tuple[float, int, List[float]]]:
    """(score, label, [x1, y1, x2, y2] in pixels of ``image``, clipped to it) with score >= threshold,
    best first (DETR's post-processor returns its queries in query order).

    The model runs as in `forward_image`; post-processing always runs in float32.
    """
    outputs = forward_image(model, image, transform, device, amp, size_divisibility)
    # the original (h, w): post-processing scales the normalised boxes back to the file's pixels
    sizes = torch.tensor([[image.height, image.width]], device=device)
    result = postprocess(engine.float_outputs(outputs), sizes)[0]
    bounds = torch.tensor([image.width, image.height] * 2, device=device, dtype=result["boxes"].dtype)
    boxes = result["boxes"].clamp(min=0).minimum(bounds)
    kept = (result["scores"] >= threshold).nonzero().flatten()
    kept = kept[result["scores"][kept].argsort(descending=True, stable=True)]
    return [(float(s), int(l), [float(v) for v in b])
            for s, l, b in zip(result["scores"][kept].cpu(), result["labels"][kept].cpu(), boxes[kept].cpu())]


@torch.inference_mode()
def forward_image(model: torch.nn.Module, image: Image.Image, transform, device: torch.device,
                  amp: Optional[str] = None, size_divisibility: int = 1) -> Dict[str, Any]:
    """The model's outputs for ``image``: it goes in as a batch of one, (1, 3, H, W) padded to
    multiples of ``size_divisibility`` (mask on the padding), under engine.autocast_context(device,
    amp), as in evaluation (also tools/visualize.py's forward)."""
    tensor, _ = transform(image, None)
    samples = nested_tensor_from_tensor_list([tensor.to(device)], size_divisibility)
    with engine.autocast_context(device, amp):
        return model(samples)


def _font(size: int) -> Union[ImageFont.FreeTypeFont, ImageFont.ImageFont]:
    """Pillow's bundled scalable font at ``size`` pixels (bitmap fallback without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def draw_detections(image: Image.Image, detections: Sequence[Detection]) -> Image.Image:
    """A copy of ``image`` with one coloured box and a 'name score' tag per detection."""
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    # sizes follow the image so that boxes and text stay readable on small and large files
    line = max(2, round(min(image.size) / 200))
    font = _font(max(10, round(min(image.size) / 40)))
    for det in sorted(detections, key=lambda d: d["score"]):  # best drawn last, on top
        colour = PALETTE[det["label"] % len(PALETTE)]
        x1, y1, x2, y2 = det["box_xyxy"]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        text = f"{det['name']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 2 * line, bottom - top + 2 * line
        tag_y = y1 - tag_h if y1 - tag_h >= 0 else y1  # above the box, or inside when at the top edge
        draw.rectangle((x1, tag_y, x1 + tag_w, tag_y + tag_h), fill=colour)
        draw.text((x1 + line - left, tag_y + line - top), text, fill=_text_colour(colour), font=font)
    return canvas


def _text_colour(background: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Black on light tags, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def output_path(output_dir: Path, image_path: Path, used: Set[str], tag: str = OUTPUT_TAG,
                suffix: Optional[str] = None) -> Path:
    """``<stem><tag><ext>`` in output_dir, with a counter when another input already took the name;
    ``suffix`` (e.g. ".png") replaces the input's extension."""
    if suffix is None:
        suffix = image_path.suffix.lower() if image_path.suffix.lower() in IMAGE_SUFFIXES else ".png"
    name, count = f"{image_path.stem}{tag}{suffix}", 0
    while name in used:
        count += 1
        name = f"{image_path.stem}{tag}_{count}{suffix}"
    used.add(name)
    return output_dir / name


def save_image(image: Image.Image, path: Path) -> None:
    """Saves in the format of the file suffix (high-quality JPEG for .jpg/.jpeg)."""
    if path.suffix in (".jpg", ".jpeg"):
        image.save(path, quality=JPEG_QUALITY)
    else:
        image.save(path)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def load_detector(args: argparse.Namespace, ckpt_state: Mapping[str, torch.Tensor],
                  device: torch.device) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """The model of ``args`` with the checkpoint's weights, on ``device`` in eval mode (compiled
    with --compile), and its post-processor."""
    model, _, postprocessors = build_model(args)
    load_checkpoint_weights(model, ckpt_state, args.resume)
    model.to(device).eval()
    if args.compile:
        model = compile_model(model, args.size_divisibility)
    return model, postprocessors["bbox"]


def run(args: argparse.Namespace, ckpt_state: Optional[Mapping[str, torch.Tensor]],
        stored_names: Optional[Mapping[int, str]] = None,
        onnx_model: Optional[OnnxRuntimeDetector] = None) -> List[Dict[str, Any]]:
    """Builds the model, loads the weights (or takes the onnxruntime one), processes every image;
    returns the JSON records.

    ``stored_names``: the checkpoint's (or the ONNX file's) class names (id -> name), used unless
    --ann is given.
    """
    device = torch.device("cpu") if onnx_model is not None else resolve_device(args.device)
    args.device = str(device)
    check_args(args)  # main.py's checks and notes (--amp off CUDA runs in float32)
    if onnx_model is not None:
        check_onnx_logits(onnx_model, args)
    images = list_images(args.images, args.recursive)
    if onnx_model is not None:
        model, postprocess = onnx_model, postprocessor(meta_arch(args))
    else:
        model, postprocess = load_detector(args, ckpt_state, device)
    names = load_class_names(args.ann, default_num_classes(args), stored_names)
    transform = make_coco_transforms("val", max_size=args.max_size, val_size=args.val_size)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    for path in images:
        image = load_image(path, args.apply_exif)
        found = detect(model, postprocess, image, transform, device, args.threshold, args.amp,
                       args.size_divisibility)
        detections = [{"label": label, "name": class_name(names, label), "score": score, "box_xyxy": box}
                      for score, label, box in found]
        out = output_path(output_dir, path, used)
        save_image(draw_detections(image, detections), out)
        records.append({"image": str(path), "output": str(out), "width": image.width, "height": image.height,
                        "detections": detections})
        print(f"{path}: {len(detections)} detections -> {out}")
    with open(output_dir / JSON_NAME, "w") as f:
        json.dump(records, f, indent=1)
    return records


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Parses the command line, merges the checkpoint's model flags, runs the demo."""
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    if bool(args.resume) == bool(args.onnx):
        parser.error("give one of --resume CHECKPOINT (path or https URL of trained weights) "
                     "and --onnx MODEL.onnx (an exported model)")
    if not args.output_dir:
        parser.error("--output_dir is required (where the drawn images and detections.json go)")
    if args.onnx:
        refused = [f"--{flag}" for flag in ONNX_REFUSED_FLAGS if getattr(args, flag)]
        if refused:
            parser.error(f"{' and '.join(refused)} apply to the PyTorch model (--resume) only: with --onnx, "
                         f"onnxruntime runs the exported float32 graph on the CPU")
        onnx_model = OnnxRuntimeDetector(args.onnx)
        taken = adopt_model_flags(args, onnx_model.metadata, given_flags(parser, argv, args))
        if taken:
            print(taken_line(taken, "the ONNX file"))
        return run(args, None, onnx_model.class_names, onnx_model=onnx_model)
    state, class_names = adopt_checkpoint(parser, argv, args)
    return run(args, state, class_names)


def adopt_checkpoint(parser: argparse.ArgumentParser, argv: Sequence[str], args: argparse.Namespace
                     ) -> Tuple[Mapping[str, torch.Tensor], Optional[Mapping[int, str]]]:
    """Loads --resume and takes its model flags into ``args`` (those not on the command line
    ``argv``); returns its state dict and stored class names (also tools/visualize.py's loader)."""
    ckpt = load_checkpoint(args.resume, map_location="cpu")
    state = model_state_from(ckpt, args.resume)
    taken = adopt_model_flags(args, stored_flags(ckpt, state), given_flags(parser, argv, args))
    if taken:
        print(taken_line(taken))
    return state, ckpt.get("class_names")


if __name__ == "__main__":
    main()
