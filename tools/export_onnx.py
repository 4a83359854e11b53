"""Export a trained SAM-DETR or DETR checkpoint to ONNX and check it with onnxruntime.

Examples:
    python tools/export_onnx.py --resume output/checkpoint.pth --output model.onnx
    python tools/export_onnx.py --resume r50_smca_e12.pth --smca --epochs 12 --output model.onnx \\
        --postprocess --benchmark

Model flags are those of main.py; the model flags stored in the checkpoint are used unless given on
the command line, by the resume policy main.py and demo.py follow (util/resume.py; ``meta_arch``
among them: a DETR checkpoint of main.py exports DETR). The file's inputs are ``images`` (B, 3, H, W) float32, normalised as in
evaluation, and ``mask`` (B, H, W) bool, True on padding; its outputs ``pred_logits`` (B, Q, C)
(C = num_classes for SAM-DETR, num_classes + 1 for DETR, the last one "no object") and
``pred_boxes`` (B, Q, 4), normalised cxcywh. Batch, height and width are dynamic (sides of at least
64 pixels). ``--postprocess`` adds an input ``orig_sizes`` (B, 2) int64 of (height, width) and the
outputs ``scores``, ``labels`` and ``boxes`` (xyxy pixels of orig_sizes) of the model's own
post-processing: SAM-DETR's top 100 (query, class) pairs, DETR's every query with its best real
class. The architecture flags and the checkpoint's category names (``class_names``, saved by
main.py) are stored in the file's metadata (``samdetr_args`` and ``samdetr_class_names``, JSON)
for ``demo.py --onnx``.

After writing the file, the tool runs it with onnxruntime on a padded batch of two images and
prints the largest difference to PyTorch eager (it stops with an error above --tolerance).
``--benchmark`` also prints the CPU seconds per image of onnxruntime and of PyTorch eager on
one image of 800 x 1200 (each the median of --runs runs, the two alternated, both on
--threads threads).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

# Run as a script, python puts tools/ (not the repository root) on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo import load_checkpoint_weights, model_state_from  # noqa: E402
from main import get_args_parser  # noqa: E402
from models import build_model  # noqa: E402
from models.export import (DETECTION_NAMES, OUTPUT_NAMES, DetectorGraph, DetectorGraphWithDetections,  # noqa: E402
                           OnnxRuntimeDetector, example_inputs, export_onnx)
from util.checkpoint import load_checkpoint  # noqa: E402
from util.misc import NestedTensor  # noqa: E402
from util.resume import MODEL_FLAGS, adopt_model_flags, given_flags, stored_flags, taken_line  # noqa: E402

DEFAULT_TOLERANCE = 1e-4
BENCHMARK_SIZE = (800, 1200)  # a COCO val2017 image after the evaluation resize, roughly
DEFAULT_RUNS = 5
WARMUP_RUNS = 1
BENCHMARK_SEED = 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SAM-DETR / DETR ONNX export", parents=[get_args_parser()],
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--postprocess", action="store_true",
                        help="also output the post-processed scores, labels and pixel boxes for an orig_sizes "
                             "input (SAM-DETR: the top 100 (query, class) pairs; DETR: every query)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest accepted |onnxruntime - PyTorch| on logits and boxes")
    parser.add_argument("--benchmark", action="store_true",
                        help="print onnxruntime's and PyTorch eager's CPU time per 800 x 1200 image")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed runs of each in --benchmark")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of both PyTorch and onnxruntime (default: PyTorch's default)")
    return parser


def max_differences(expected: Sequence[Tensor], actual: Dict[str, Tensor], names: Sequence[str]) -> Dict[str, float]:
    """name -> largest absolute difference between the PyTorch and the onnxruntime output."""
    return {name: float((actual[name].to(e.dtype) - e).abs().max()) for name, e in zip(names, expected)}


def check_against_eager(model: torch.nn.Module, detector: OnnxRuntimeDetector, postprocess: bool,
                        tolerance: float) -> Dict[str, float]:
    """Runs both on the export example (a padded batch of two); stops when logits or boxes differ."""
    inputs = example_inputs(postprocess)
    graph = DetectorGraphWithDetections(model) if postprocess else DetectorGraph(model)
    with torch.inference_mode():
        expected = graph(*inputs)
    names = OUTPUT_NAMES + (DETECTION_NAMES if postprocess else ())
    diffs = max_differences(expected, detector.run(*inputs), names)
    print("onnxruntime vs PyTorch eager, largest |difference|: "
          + ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items() if name != "labels"))
    worst = max(diffs[name] for name in OUTPUT_NAMES)
    if worst > tolerance:
        raise SystemExit(f"onnxruntime differs from PyTorch by {worst:.2e} > --tolerance {tolerance:g}")
    return diffs


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def benchmark(model: torch.nn.Module, detector: OnnxRuntimeDetector, runs: int) -> Dict[str, float]:
    """Median CPU seconds per 800 x 1200 image, onnxruntime and PyTorch eager, runs alternated."""
    generator = torch.Generator().manual_seed(BENCHMARK_SEED)
    image = torch.randn(1, 3, *BENCHMARK_SIZE, generator=generator)
    mask = torch.zeros(1, *BENCHMARK_SIZE, dtype=torch.bool)
    sizes = torch.tensor([BENCHMARK_SIZE])

    def eager():
        with torch.inference_mode():
            model(NestedTensor(image, mask))

    def onnxruntime():
        detector.run(image, mask, sizes)

    times: Dict[str, List[float]] = {"onnxruntime": [], "pytorch": []}
    for _ in range(WARMUP_RUNS):
        eager()
        onnxruntime()
    for _ in range(runs):  # alternated, so that load from other processes hits both alike
        times["onnxruntime"].append(_seconds(onnxruntime))
        times["pytorch"].append(_seconds(eager))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"CPU time per {BENCHMARK_SIZE[0]}x{BENCHMARK_SIZE[1]} image (median of {runs}, "
          f"{torch.get_num_threads()} threads): onnxruntime {medians['onnxruntime']:.3f} s, "
          f"PyTorch eager {medians['pytorch']:.3f} s "
          f"(onnxruntime/PyTorch {medians['onnxruntime'] / medians['pytorch']:.2f})")
    return medians


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Exports, checks and (with --benchmark) times; returns the measured differences and times."""
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    if not args.resume:
        parser.error("--resume CHECKPOINT is required (path or https URL of trained weights)")
    ckpt = load_checkpoint(args.resume, map_location="cpu")
    state = model_state_from(ckpt, args.resume)
    taken = adopt_model_flags(args, stored_flags(ckpt, state), given_flags(parser, argv, args))
    if taken:
        print(taken_line(taken))
    args.device = "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, _ = build_model(args)
    load_checkpoint_weights(model, state, args.resume)
    model.eval()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    flags = {flag: getattr(args, flag) for flag in MODEL_FLAGS}
    class_names = ckpt.get("class_names") or {}
    export_onnx(model, output, postprocess=args.postprocess, metadata=flags, class_names=class_names)
    if not class_names:
        print("the checkpoint stores no class names: demo.py --onnx takes them from --ann "
              "(or uses COCO's for 91 classes)")
    print(f"wrote {output} ({output.stat().st_size / 2 ** 20:.1f} MiB) in {time.perf_counter() - start:.0f} s")
    # the same thread count for both, so that --benchmark compares like with like
    detector = OnnxRuntimeDetector(output, threads=torch.get_num_threads())
    results = check_against_eager(model, detector, args.postprocess, args.tolerance)
    if args.benchmark:
        results.update(benchmark(model, detector, args.runs))
    return results


if __name__ == "__main__":
    main()
