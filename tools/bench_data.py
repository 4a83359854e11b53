"""Data loading at COCO scale: build time and memory, worker memory over an epoch, augmentation speed.

Compares this project's dataset (flat annotation arrays, uint8-tensor training augmentation)
with a pipeline built like the official one (torchvision's CocoDetection holding a pycocotools
COCO object, dict-based target preparation, PIL augmentation and to_tensor).

    python tools/make_coco_scale.py --out /tmp/coco_scale
    python tools/bench_data.py --data /tmp/coco_scale --workers 8 --items 6000

Prints, for both pipelines: seconds and peak RSS to build the training dataset; the PSS
(proportional set size, /proc/<pid>/smaps_rollup) of the main process plus its workers early in
an epoch and after --items items, on --data and on a tiny dataset of the same images (the
difference is the memory the annotations add); each worker's growth; and single-process
training-augmentation images/s (one worker's speed). Each measurement runs in a fresh process.
Linux only (/proc).
"""
import argparse
import contextlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

# Run as a script, python puts tools/ (not the repository root) on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torchvision  # noqa: E402

import datasets.transforms as T  # noqa: E402
from datasets.coco import CocoDetection  # noqa: E402
from tools.make_coco_scale import write_coco_scale  # noqa: E402
from util.misc import collate_fn  # noqa: E402

PIPELINES = ("flat", "official")
ANN_NAME = "annotations/instances_train2017.json"
IMG_NAME = "train2017"
TINY_IMAGES, TINY_OBJECTS = 100, 727  # COCO's objects per image
BATCH_SIZE = 2  # per GPU, as in the official recipe
EARLY_BATCHES = 100  # the "early in the epoch" reading
MIN_AVAILABLE_GIB = 3.0  # stop a run before the machine runs out of memory
KIB, MIB, GIB = 2 ** 10, 2 ** 20, 2 ** 30
GPU_TARGET_IMAGES_PER_S = 50.0  # one GPU's training step at its target (bf16)


# --------------------------------------------------------------------------------------
# The official-style pipeline
# --------------------------------------------------------------------------------------
def dict_based_target(annotations: List[dict], *, image_id: int, width: int,
                      height: int) -> Dict[str, torch.Tensor]:
    """DETR target from a list of COCO annotation dicts (the preparation before the flat store)."""
    objects = [obj for obj in annotations if obj.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([obj["bbox"] for obj in objects], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    size = torch.as_tensor([int(height), int(width)])
    return {"boxes": boxes[keep],
            "labels": torch.tensor([obj["category_id"] for obj in objects], dtype=torch.int64)[keep],
            "image_id": torch.tensor([image_id]),
            "area": torch.tensor([float(obj["area"]) for obj in objects], dtype=torch.float32)[keep],
            "iscrowd": torch.tensor([obj.get("iscrowd", 0) for obj in objects], dtype=torch.int64)[keep],
            "orig_size": size, "size": size.clone()}


class OfficialStyleCocoDetection(torchvision.datasets.CocoDetection):
    """torchvision's CocoDetection (a pycocotools COCO object, polygons included, in every
    worker) with dict-based target preparation and joint (PIL image, target) transforms."""

    def __init__(self, img_folder: Path, ann_file: Path, transforms=None):
        with contextlib.redirect_stdout(io.StringIO()):
            super().__init__(str(img_folder), str(ann_file))
        self.detr_transforms = transforms

    def __getitem__(self, index: int):
        image, annotations = super().__getitem__(index)
        target = dict_based_target(annotations, image_id=self.ids[index], width=image.width, height=image.height)
        if self.detr_transforms is not None:
            image, target = self.detr_transforms(image, target)
        return image, target


def make_dataset(pipeline: str, data: Path, image_set: str = "train"):
    """The training dataset of ``pipeline`` ('flat' or 'official') on data/train2017."""
    backend = "tensor" if pipeline == "flat" else "pil"
    transforms = T.make_coco_transforms(image_set, train_backend=backend)
    if pipeline == "flat":
        return CocoDetection(img_folder=data / IMG_NAME, ann_file=data / ANN_NAME, transforms=transforms)
    return OfficialStyleCocoDetection(data / IMG_NAME, data / ANN_NAME, transforms)


# --------------------------------------------------------------------------------------
# Memory readings
# --------------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> Dict[str, int]:
    """Pss, Rss, Private_* ... of process ``pid`` in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name] = int(value.split()[0]) * KIB
    return fields


def child_pids(pid: int) -> List[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return sorted(children)


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * KIB
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # Linux reports KiB


def process_memory(main_pid: int) -> dict:
    """PSS of the main process and of each worker, and each worker's unshared memory, in bytes."""
    workers = child_pids(main_pid)
    readings = {pid: smaps_rollup(pid) for pid in workers}
    return {"main_pss": smaps_rollup(main_pid)["Pss"],
            "worker_pss": [readings[pid]["Pss"] for pid in workers],
            "worker_uss": [readings[pid]["Private_Clean"] + readings[pid]["Private_Dirty"] for pid in workers]}


# --------------------------------------------------------------------------------------
# Measurements (each in its own process)
# --------------------------------------------------------------------------------------
def measure_build(pipeline: str, data: Path) -> dict:
    """Seconds, and peak / final RSS above the RSS before building (python, torch imported)."""
    before = smaps_rollup(os.getpid())["Rss"]
    start = time.perf_counter()
    dataset = make_dataset(pipeline, data)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": peak_rss_bytes() - before,
            "rss_after": smaps_rollup(os.getpid())["Rss"] - before, "images": len(dataset)}


def measure_loader(pipeline: str, data: Path, *, workers: int, items: int, seed: int) -> dict:
    """Iterates ``items`` training items (random order, batches of BATCH_SIZE) with ``workers``
    workers; memory readings after EARLY_BATCHES batches and at the end."""
    torch.manual_seed(seed)
    dataset = make_dataset(pipeline, data)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=items)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler, num_workers=workers,
                                         collate_fn=collate_fn, drop_last=True)
    main_pid, early, late, done, stopped = os.getpid(), None, None, 0, False
    start = time.perf_counter()
    for batch_index, _ in enumerate(loader):
        done += BATCH_SIZE
        if batch_index + 1 == EARLY_BATCHES:
            early = process_memory(main_pid)
        stopped = available_bytes() < MIN_AVAILABLE_GIB * GIB
        if stopped or batch_index + 1 == len(loader):
            late = process_memory(main_pid)  # while the workers are still alive
            break
    return {"early": early, "late": late, "items": done, "stopped_low_memory": stopped,
            "seconds": time.perf_counter() - start}


def measure_speed(data: Path, *, images: int, rounds: int, seed: int) -> dict:
    """Single-process training-augmentation images/s of both pipelines, rounds interleaved."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    datasets = {pipeline: make_dataset(pipeline, data) for pipeline in PIPELINES}
    rates = {pipeline: [] for pipeline in PIPELINES}
    for round_index in range(rounds):
        for pipeline, dataset in datasets.items():
            random.seed(seed + round_index)
            start = time.perf_counter()
            for index in range(images):
                dataset[index % len(dataset)]
            rates[pipeline].append(images / (time.perf_counter() - start))
    return {pipeline: statistics.median(values) for pipeline, values in rates.items()}


def run_child(command: str, **options) -> dict:
    """Runs one measurement in a fresh python process; returns its json result."""
    argv = [sys.executable, __file__, "--_child", command]
    for name, value in options.items():
        argv += [f"--{name}", str(value)]
    result = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def mib(value: float) -> str:
    return f"{value / MIB:8.0f}"


def total_pss(reading: dict) -> float:
    return reading["main_pss"] + sum(reading["worker_pss"])


def report_loader(name: str, big: dict, tiny: dict) -> Dict[str, float]:
    growth = [late - early for early, late in zip(big["early"]["worker_pss"], big["late"]["worker_pss"])]
    uss_growth = [late - early for early, late in zip(big["early"]["worker_uss"], big["late"]["worker_uss"])]
    added = {when: total_pss(big[when]) - total_pss(tiny[when]) for when in ("early", "late")}
    stopped = ", stopped: low memory" if big["stopped_low_memory"] else ""
    indent = " " * len(f"{name:9s} ")
    print(f"{name:9s} PSS main+workers early {mib(total_pss(big['early']))} MiB, after {big['items']} items "
          f"{mib(total_pss(big['late']))} MiB ({big['seconds']:.0f} s{stopped})")
    print(f"{indent}tiny dataset           {mib(total_pss(tiny['early']))} MiB, after {tiny['items']} items "
          f"{mib(total_pss(tiny['late']))} MiB")
    print(f"{indent}annotations add        {mib(added['early'])} MiB early, {mib(added['late'])} MiB late "
          f"(main process alone: {mib(big['late']['main_pss'] - tiny['late']['main_pss'])} MiB)")
    print(f"{indent}worker PSS growth max  {mib(max(growth))} MiB (mean {mib(statistics.mean(growth))}), "
          f"unshared growth max {mib(max(uss_growth))} MiB")
    return {"added_late": added["late"], "growth_max": max(growth)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder from tools/make_coco_scale.py")
    parser.add_argument("--tiny_data", type=Path, default=None,
                        help="baseline dataset; default: written to a temporary folder")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--items", type=int, default=6000, help="items per loader run")
    parser.add_argument("--speed_images", type=int, default=100)
    parser.add_argument("--speed_rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=("build", "loader", "speed"))
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", default=None, choices=PIPELINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(run_measurement(args)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        tiny = args.tiny_data
        if tiny is None:
            tiny = Path(scratch)
            write_coco_scale(tiny, num_images=TINY_IMAGES, num_objects=TINY_OBJECTS, seed=args.seed)
        report(args, tiny)


def run_measurement(args) -> dict:
    if args._child == "build":
        return measure_build(args.pipeline, args.data)
    if args._child == "loader":
        return measure_loader(args.pipeline, args.data, workers=args.workers, items=args.items, seed=args.seed)
    if args._child == "speed":
        return measure_speed(args.data, images=args.speed_images, rounds=args.speed_rounds, seed=args.seed)
    raise ValueError(f"unknown measurement {args._child!r}")


def report(args, tiny: Path) -> None:
    print(f"data: {args.data}; workers: {args.workers}; batch size {BATCH_SIZE}")
    if "build" not in args.skip:
        for pipeline in PIPELINES:
            result = run_child("build", pipeline=pipeline, data=args.data)
            print(f"{pipeline:9s} build {result['images']} images: {result['seconds']:6.1f} s, peak RSS "
                  f"+{mib(result['peak_rss'])} MiB, RSS after +{mib(result['rss_after'])} MiB "
                  "(above python + torch)", flush=True)
    if "loader" not in args.skip:
        summary = {}
        for pipeline in PIPELINES:
            options = dict(pipeline=pipeline, workers=args.workers, items=args.items, seed=args.seed)
            big = run_child("loader", data=args.data, **options)
            small = run_child("loader", data=tiny, **options)
            summary[pipeline] = report_loader(pipeline, big, small)
            sys.stdout.flush()
        ratio = summary["flat"]["added_late"] / summary["official"]["added_late"]
        print(f"annotation memory, flat / official: {ratio:.3f} (goal <= 0.25); "
              f"flat worker growth max {summary['flat']['growth_max'] / MIB:.0f} MiB (goal <= 50)")
    if "speed" not in args.skip:
        rates = run_child("speed", data=tiny, speed_images=args.speed_images, speed_rounds=args.speed_rounds,
                          seed=args.seed)
        needed = GPU_TARGET_IMAGES_PER_S / rates["flat"]
        print(f"training augmentation, one process: flat {rates['flat']:.1f} images/s, official-style "
              f"{rates['official']:.1f} images/s, ratio {rates['flat'] / rates['official']:.2f} (goal >= 1.5); "
              f"{GPU_TARGET_IMAGES_PER_S:.0f} images/s take {needed:.2f} workers at this speed")


if __name__ == "__main__":
    main()
