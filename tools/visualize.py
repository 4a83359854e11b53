"""Draw what SAM-DETR's decoder did for its top detections: reference boxes, salient points and
attention, read from the model as it runs.

Example:
    python tools/visualize.py --resume output/shapes/checkpoint.pth --images data/shapes/val2017 \\
        --output_dir /tmp/vis --top 3 --threshold 0.3

Loading is demo.py's: the model flags come from the checkpoint (demo.adopt_checkpoint), the model
is built and loaded by demo.load_detector, images are read and resized as demo.py reads them, and
the detections are the post-processor's (--threshold), at most --top per image, one per query.

Outputs, in --output_dir, per image: ``<stem>_vis.png`` and ``<stem>_vis.json`` (the numbers
drawn). For SAM-DETR (--meta_arch sam_detr) the picture has a first row with the detections
(demo.draw_detections) and, per detection, its reference box through the decoder: the learnt
initial box (dashed), every later layer's reference and the final box (thick), light to dark.
Then one row per detection and decoder layer: the layer's reference box with every head's salient
point (one colour per head; with --sam_resample avgpool/maxpool the RoI's pooling grid and the box
centre, which replaces the points; with --no_sam the box only), titled with the feature level the
layer read (multi-scale: 0 = stride 8 ... 2 = stride 32); and one panel per head: its
cross-attention weights over the image (each panel scaled to its own maximum), the head's point
(x) and with --smca the level lines of its Gaussian prior (exp of the log-prior at 0.25 and 0.75).
For DETR (--meta_arch detr) the picture is that of DETR's notebook: per detection the last decoder
layer's cross-attention, averaged over the heads, above the image with the detection's box.

The numbers are the model's own, recorded as it runs (models/record.py): the decoder layers and
their cross-attentions hand out the tensors they compute, nothing here recomputes them. With a
recorder, an attention that would run the fused kernel (--no_sam, DETR) runs the written-out
softmax(QK^T)V instead, whose outputs agree to float rounding; SAM-DETR's own cross-attention
makes its weights in any case, so its numbers do not change at all (tests/test_visualize.py).
"""
import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import demo  # noqa: E402
from datasets.coco import load_image  # noqa: E402
from datasets.transforms import make_coco_transforms  # noqa: E402
from main import check_args  # noqa: E402
from models.decoder import ROI_SIZE  # noqa: E402
from models.meta_arch import meta_arch  # noqa: E402
from models.record import Recordable  # noqa: E402
from models.sam_detr import default_num_classes  # noqa: E402
from util.box_ops import box_cxcywh_to_xyxy  # noqa: E402

DEFAULT_TOP = 3
OUTPUT_TAG = "_vis"
PANEL_INCHES = 2.0             # side of one panel
DPI = 100
PANEL_PIXELS = round(PANEL_INCHES * DPI)
TITLE_SIZE = 7
HEAT_ALPHA = 0.6               # opacity of an attention map over the image
HEAT_CMAP = "inferno"
POINT_SIZE = 30                # scatter marker area (points^2)
LINE_WIDTH = 1.5               # boxes; thinner and bolder variants below
FINE_LINE, GRID_LINE, BOLD_LINE = LINE_WIDTH / 2, LINE_WIDTH / 3, LINE_WIDTH * 2
CELL_CENTRE = 0.5              # a map cell's centre, in cells from its corner
PRIOR_LEVELS = (0.25, 0.75)    # level lines of SMCA's Gaussian, exp(log-prior), which peaks at 1
TRAJECTORY_CMAP = "viridis"
HEAD_COLOURS = plt.get_cmap("tab10").colors
ARGS_REFUSED = ("onnx", "compile")  # recording needs the eager PyTorch model

Record = Dict[str, Any]


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------
def keep(value: Any) -> Any:
    """A float32 CPU copy of a tensor (a recorded value may be changed in place after the call,
    see models/record.py); other values as they are."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", torch.float32, copy=True)
    return value


@contextmanager
def recording(groups: Sequence[Sequence[Recordable]]) -> Iterator[List[Record]]:
    """Attaches one recorder to every group of modules (a decoder layer and its cross-attention);
    yields one dict per group, name -> copy of what was recorded; detaches on exit."""
    records: List[Record] = [{} for _ in groups]
    for record, group in zip(records, groups):
        for module in group:
            module.recorder = lambda name, value, record=record: record.__setitem__(name, keep(value))
    try:
        yield records
    finally:
        for group in groups:
            for module in group:
                del module.recorder  # back to the class's None


def recorded_modules(model: nn.Module, arch: str) -> List[List[Recordable]]:
    """SAM-DETR: every decoder layer with its cross-attention; DETR: the last layer's cross-attention."""
    if arch == "detr":
        return [[model.transformer.decoder.layers[-1].multihead_attn]]
    return [[layer, layer.cross_attn] for layer in model.transformer.decoder.layers]


@contextmanager
def detr_map_size(model: nn.Module, record: Record) -> Iterator[None]:
    """DETR's attention covers its flattened C5 map: a forward pre-hook on the transformer notes the
    map's padding mask (B, H, W), which gives the map's shape and its unpadded part."""
    def note(module: nn.Module, args: Tuple[Tensor, ...]) -> None:
        record["mask"] = args[1].detach().cpu()

    handle = model.transformer.register_forward_pre_hook(note)
    try:
        yield
    finally:
        handle.remove()


def record_forward(model: nn.Module, arch: str, image: Image.Image, transform, device: torch.device,
                   amp: Optional[str] = None, size_divisibility: int = 1) -> Tuple[Dict[str, Any], List[Record]]:
    """demo.forward_image with recorders attached -> (outputs, one record per group of
    `recorded_modules`)."""
    with recording(recorded_modules(model, arch)) as records:
        if arch == "detr":
            with detr_map_size(model, records[0]):
                outputs = demo.forward_image(model, image, transform, device, amp, size_divisibility)
        else:
            outputs = demo.forward_image(model, image, transform, device, amp, size_divisibility)
    return outputs, records


def top_queries(postprocess: nn.Module, outputs: Dict[str, Any], top: int,
                threshold: float) -> List[Tuple[int, float, int]]:
    """(query, score, label) of the post-processor's best detections of image 0 with score >=
    threshold, best first, at most `top`, one per query (its best class).

    The post-processor chooses as in evaluation and demo.py. To learn the query of each choice
    without re-implementing it, it is given boxes of zero size whose centre x is the query index:
    it gathers boxes by query and scales them by the target size, here 1, so x1 is the index.
    """
    logits = outputs["pred_logits"][:1].float()
    queries = logits.shape[1]
    index_boxes = torch.zeros(1, queries, 4, device=logits.device)
    index_boxes[..., 0] = torch.arange(queries, device=logits.device)
    unit_size = torch.ones(1, 2, device=logits.device)
    result = postprocess({"pred_logits": logits, "pred_boxes": index_boxes}, unit_size)[0]
    order = result["scores"].argsort(descending=True, stable=True).cpu()
    picks: List[Tuple[int, float, int]] = []
    for score, label, query in zip(result["scores"].cpu()[order], result["labels"].cpu()[order],
                                   result["boxes"][:, 0].cpu()[order]):
        if len(picks) == top or score < threshold:
            break
        if int(query) not in {p[0] for p in picks}:
            picks.append((int(query), float(score), int(label)))
    return picks


# --------------------------------------------------------------------------------------------
# The numbers drawn
# --------------------------------------------------------------------------------------------
def unpadded(maps: Tensor, map_size: Tuple[int, int], valid: Tuple[int, int]) -> Tensor:
    """(heads, H*W) over a padded map -> (heads, h, w), its unpadded top-left part."""
    return maps.unflatten(-1, map_size)[:, :valid[0], :valid[1]]


def valid_cells(valid_ratio: Tensor, map_size: Tuple[int, int]) -> Tuple[int, int]:
    """(2,) unpadded fraction (w, h) of the map, as the decoder got it -> unpadded (rows, columns)."""
    return round(float(valid_ratio[1]) * map_size[0]), round(float(valid_ratio[0]) * map_size[1])


def detection_base(outputs: Dict[str, Any], pick: Tuple[int, float, int], names: Dict[int, str],
                   image: Image.Image) -> Record:
    """query, label, name, score, final box (normalised cxcywh) and box_xyxy (pixels, clipped)."""
    query, score, label = pick
    final = outputs["pred_boxes"][0, query].float().cpu()
    scale = torch.tensor([image.width, image.height] * 2, dtype=torch.float32)
    box = torch.minimum((box_cxcywh_to_xyxy(final) * scale).clamp(min=0), scale)
    return {"query": query, "label": label, "name": demo.class_name(names, label), "score": score,
            "final_box": final, "box_xyxy": box.tolist()}


def sam_layer(record: Record, query: int, level: int, pooled: bool) -> Record:
    """One decoder layer's numbers for one query (image 0): level, map size, reference box
    (cxcywh, normalised), attention (heads, h, w) and, as the variant has them, points
    (heads, 2) normalised to the image, SMCA scales and log-prior (heads, h, w), the pooled RoI
    (xyxy, normalised)."""
    map_size = tuple(record["map_size"])
    valid = valid_cells(record["valid_ratio"][0], map_size)
    layer = {"level": level, "map_size": list(map_size), "reference_box": record["boxes"][0, query],
             "attention": unpadded(record["weights"][0, :, query], map_size, valid)}
    if "points" in record:
        layer["points"] = record["points"][0, query]
    if "scales" in record:
        layer["scales"] = record["scales"][0, query]
        layer["smca_prior"] = unpadded(record["smca_prior"][0, :, query], map_size, valid)
    if pooled:
        layer["roi_box"] = record["roi_boxes"][0, query] / record["box_scale"][0, 0]
        layer["roi_grid"] = ROI_SIZE
    return layer


def sam_detections(model: nn.Module, outputs: Dict[str, Any], records: List[Record],
                   picks: List[Tuple[int, float, int]], names: Dict[int, str], image: Image.Image) -> List[Record]:
    """Per detection: its base record and "layers", one `sam_layer` per decoder layer."""
    decoder = model.transformer.decoder
    pooled = [layer.aligner.enabled and not layer.aligner.salient for layer in decoder.layers]
    found = []
    for pick in picks:
        det = detection_base(outputs, pick, names, image)
        det["layers"] = [sam_layer(r, pick[0], lvl, p) for r, lvl, p in zip(records, decoder.level_of_layer, pooled)]
        found.append(det)
    return found


def detr_detections(outputs: Dict[str, Any], record: Record, picks: List[Tuple[int, float, int]],
                    names: Dict[int, str], image: Image.Image) -> List[Record]:
    """Per detection: its base record and "attention" (heads, h, w), the last decoder layer's."""
    mask = record["mask"][0]
    valid = (int((~mask[:, 0]).sum()), int((~mask[0, :]).sum()))
    found = []
    for pick in picks:
        det = detection_base(outputs, pick, names, image)
        det["attention"] = unpadded(record["weights"][0, :, pick[0]], tuple(mask.shape), valid)
        found.append(det)
    return found


def to_json(value: Any) -> Any:
    """Tensors -> nested lists, through dicts and lists."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
def pixels(box_cxcywh: Tensor, image: Image.Image) -> Tuple[float, float, float, float]:
    """Normalised cxcywh -> (x, y, width, height) of the box's corner in image pixels."""
    x1, y1, x2, y2 = (box_cxcywh_to_xyxy(box_cxcywh) * torch.tensor([image.width, image.height] * 2)).tolist()
    return x1, y1, x2 - x1, y2 - y1


def show(ax, image: Image.Image, title: str) -> None:
    """The image as the panel's background, in the image's pixel coordinates. It is drawn from a copy
    of the panel's own resolution: matplotlib resampling a COCO-sized image in every panel (a hundred
    or more per picture) took most of the time."""
    thumbnail = image.copy()
    thumbnail.thumbnail((PANEL_PIXELS, PANEL_PIXELS), Image.BILINEAR)
    ax.imshow(np.asarray(thumbnail), extent=(0, image.width, image.height, 0))
    ax.set_xlim(0, image.width)
    ax.set_ylim(image.height, 0)
    ax.set_title(title, fontsize=TITLE_SIZE)


def draw_box(ax, box_cxcywh: Tensor, image: Image.Image, colour, **style) -> None:
    x, y, w, h = pixels(box_cxcywh, image)
    ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, edgecolor=colour, **style))


def draw_heat(ax, heat: Tensor, image: Image.Image) -> None:
    """A (h, w) map stretched over the image, scaled to its own maximum."""
    ax.imshow(heat.numpy(), extent=(0, image.width, image.height, 0), cmap=HEAT_CMAP, alpha=HEAT_ALPHA,
              vmin=0, vmax=max(float(heat.max()), np.finfo(np.float32).tiny), interpolation="nearest")


def draw_prior(ax, log_prior: Tensor, image: Image.Image, colour) -> None:
    """Level lines of exp(log_prior) (h, w), at the map's cell centres in image pixels."""
    gauss = log_prior.exp().numpy()
    levels = [v for v in PRIOR_LEVELS if gauss.min() < v < gauss.max()]
    if not levels:
        return
    rows, cols = gauss.shape
    xs = (np.arange(cols) + CELL_CENTRE) * image.width / cols
    ys = (np.arange(rows) + CELL_CENTRE) * image.height / rows
    ax.contour(xs, ys, gauss, levels=levels, colors=[colour], linewidths=FINE_LINE)


def draw_points(ax, points: Tensor, image: Image.Image, heads: Sequence[int], marker: str) -> None:
    """points (heads, 2) normalised -> one marker per head in `heads`, in the head's colour."""
    for h in heads:
        x, y = points[h, 0] * image.width, points[h, 1] * image.height
        ax.scatter([x], [y], s=POINT_SIZE, c=[HEAD_COLOURS[h % len(HEAD_COLOURS)]], marker=marker,
                   edgecolors="white", linewidths=FINE_LINE)


def draw_roi_grid(ax, roi_xyxy: Tensor, bins: int, image: Image.Image, colour) -> None:
    """The RoI's bins x bins pooling grid (roi normalised xyxy)."""
    x1, y1, x2, y2 = (roi_xyxy * torch.tensor([image.width, image.height] * 2)).tolist()
    for t in np.linspace(0, 1, bins + 1):
        ax.plot([x1 + t * (x2 - x1)] * 2, [y1, y2], color=colour, linewidth=GRID_LINE)
        ax.plot([x1, x2], [y1 + t * (y2 - y1)] * 2, color=colour, linewidth=GRID_LINE)


def draw_trajectory(ax, det: Record, image: Image.Image) -> None:
    """Every layer's reference box (the first is the learnt initial box, dashed) and the final box (thick)."""
    show(ax, image, f"q{det['query']} {det['name']} {det['score']:.2f}: initial -> final")
    boxes = [layer["reference_box"] for layer in det["layers"]] + [det["final_box"]]
    colours = plt.get_cmap(TRAJECTORY_CMAP)(np.linspace(0, 1, len(boxes)))
    for i, (box, colour) in enumerate(zip(boxes, colours)):
        final = i == len(boxes) - 1
        draw_box(ax, box, image, colour, linestyle="--" if i == 0 else "-",
                 linewidth=BOLD_LINE if final else LINE_WIDTH)


def draw_layer(ax, layer: Record, index: int, det: Record, image: Image.Image) -> None:
    """A layer's reference box, salient points (or pooling grid and centre) and level."""
    show(ax, image, f"q{det['query']} layer {index}, level {layer['level']} "
                    f"({layer['map_size'][0]}x{layer['map_size'][1]})")
    draw_box(ax, layer["reference_box"], image, "white", linewidth=LINE_WIDTH)
    if "roi_box" in layer:
        draw_roi_grid(ax, layer["roi_box"], layer["roi_grid"], image, "white")
    if "points" in layer:
        heads = range(1) if "roi_box" in layer else range(layer["points"].shape[0])
        draw_points(ax, layer["points"], image, heads, "o")


def draw_head(ax, layer: Record, head: int, image: Image.Image) -> None:
    """One head's attention map, its point and SMCA prior."""
    colour = HEAD_COLOURS[head % len(HEAD_COLOURS)]
    show(ax, image, f"head {head}")
    draw_heat(ax, layer["attention"][head], image)
    draw_box(ax, layer["reference_box"], image, "white", linewidth=FINE_LINE)
    if "smca_prior" in layer:
        draw_prior(ax, layer["smca_prior"][head], image, colour)
    if "points" in layer:
        draw_points(ax, layer["points"], image, [head], "X")


def panels(rows: int, cols: int):
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def draw_sam(image: Image.Image, detections: List[Record], drawn: Image.Image) -> plt.Figure:
    """Row 0: detections and each one's box trajectory; then a row per detection and layer."""
    layers = len(detections[0]["layers"]) if detections else 0
    heads = detections[0]["layers"][0]["attention"].shape[0] if detections else 0
    fig, axes = panels(1 + len(detections) * layers, max(1 + heads, 1 + len(detections)))
    show(axes[0, 0], drawn, "detections")
    for d, det in enumerate(detections):
        draw_trajectory(axes[0, 1 + d], det, image)
        for i, layer in enumerate(det["layers"]):
            row = axes[1 + d * layers + i]
            draw_layer(row[0], layer, i, det, image)
            for h in range(heads):
                draw_head(row[1 + h], layer, h, image)
    return fig


def draw_detr(image: Image.Image, detections: List[Record], drawn: Image.Image) -> plt.Figure:
    """DETR's notebook: per detection the head-averaged attention above the image with its box."""
    fig, axes = panels(2, max(1, len(detections)))
    if not detections:
        show(axes[1, 0], drawn, "no detections")
    for d, det in enumerate(detections):
        axes[0, d].imshow(det["attention"].mean(0).numpy(), cmap="viridis")
        axes[0, d].set_title(f"query {det['query']}", fontsize=TITLE_SIZE)
        show(axes[1, d], image, f"{det['name']} {det['score']:.2f}")
        x1, y1, x2, y2 = det["box_xyxy"]
        axes[1, d].add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red",
                                           linewidth=BOLD_LINE))
    return fig


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """demo.py's flags (model flags from the checkpoint, --images, --threshold, --ann) plus --top."""
    parser = demo.build_parser()
    parser.description = __doc__
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help="detections drawn per image, best first")
    return parser


def visualize_image(model: nn.Module, postprocess: nn.Module, arch: str, path: Path, out: Path,
                    args: argparse.Namespace, names: Dict[int, str], transform, device: torch.device) -> Record:
    """Records the model on one image, writes out (.png) and its .json; returns the record (tensors kept)."""
    image = load_image(path, args.apply_exif)
    outputs, records = record_forward(model, arch, image, transform, device, args.amp, args.size_divisibility)
    picks = top_queries(postprocess, outputs, args.top, args.threshold)
    if arch == "detr":
        detections = detr_detections(outputs, records[0], picks, names, image)
    else:
        detections = sam_detections(model, outputs, records, picks, names, image)
    drawn = demo.draw_detections(image, detections)
    fig = (draw_detr if arch == "detr" else draw_sam)(image, detections, drawn)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    result = {"image": str(path), "output": str(out), "width": image.width, "height": image.height,
              "meta_arch": arch, "detections": detections}
    with open(out.with_suffix(".json"), "w") as f:
        json.dump(to_json(result), f)
    print(f"{path}: {len(detections)} detections drawn -> {out}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> List[Record]:
    """Parses the command line, loads the checkpoint as demo.py does, draws every image."""
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    refused = [f"--{flag}" for flag in ARGS_REFUSED if getattr(args, flag)]
    if refused or not args.resume or not args.output_dir:
        parser.error(f"give --resume CHECKPOINT and --output_dir DIR{'; not ' + ', '.join(refused) if refused else ''}"
                     " (the recorders need the eager PyTorch model)")
    state, stored_names = demo.adopt_checkpoint(parser, argv, args)
    device = demo.resolve_device(args.device)
    args.device = str(device)
    check_args(args)
    images = demo.list_images(args.images, args.recursive)
    model, postprocess = demo.load_detector(args, state, device)
    names = demo.load_class_names(args.ann, default_num_classes(args), stored_names)
    transform = make_coco_transforms("val", max_size=args.max_size, val_size=args.val_size)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    used: set = set()
    return [visualize_image(model, postprocess, meta_arch(args), path,
                            demo.output_path(output_dir, path, used, OUTPUT_TAG, ".png"), args, names, transform,
                            device)
            for path in images]


if __name__ == "__main__":
    main()
