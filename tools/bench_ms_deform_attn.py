"""Benchmark of multi-scale deformable attention implementations.

Times forward + backward (median over ``--repeats`` runs after one warm-up)
and reports the peak memory each implementation needs on top of its inputs,
on a COCO-sized encoder case: levels of 100x134, 50x67 and 25x34 (an 800x1066
image at strides 8, 16, 32), batch 2, 8 heads of 32 channels, 4 points, and by
default one query per encoder token.

Implementations:

* ``reference``: one ``F.grid_sample`` per level (the classic pure-PyTorch
  formulation);
* ``pytorch``: this project's fast PyTorch path;
* ``cuda``: this project's CUDA kernels (``--device cuda``, when built).

Every implementation runs in its own subprocess so that the CPU peak (the
resident-set high-water mark, reset just before the measured runs) is not
polluted by the others.

Examples::

    python tools/bench_ms_deform_attn.py                  # CPU, COCO-sized
    python tools/bench_ms_deform_attn.py --small          # quick check
    python tools/bench_ms_deform_attn.py --device cuda --dtype float16
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

COCO_SHAPES = [(100, 134), (50, 67), (25, 34)]
SMALL_SHAPES = [(50, 67), (25, 34), (13, 17)]
BATCH = 2
SMALL_BATCH = 1
HEADS = 8
HEAD_DIM = 32
POINTS = 4
# Spread of the sampling offsets around each reference point, in pixels of the
# level (the trained model's offsets are a few pixels).
OFFSET_STD_PIXELS = 2.0
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
METHODS = ("reference", "pytorch", "cuda")
BYTES_PER_KIB = 1024
BYTES_PER_MIB = 1024 * 1024
PROC_CLEAR_REFS = "/proc/self/clear_refs"
# Writing this to clear_refs resets the peak resident set size (VmHWM).
RESET_PEAK_RSS = "5"


def make_inputs(shapes, batch, queries, locations, dtype, device, seed=0):
    """Random inputs shaped like MSDeformAttn's in the encoder."""
    from models.ops import level_start_index
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    starts = level_start_index(spatial_shapes)
    tokens = int(spatial_shapes.prod(1).sum())
    levels = len(shapes)
    value = torch.randn(batch, tokens, HEADS, HEAD_DIM, generator=gen)
    if locations == "uniform":
        sampling = torch.rand(batch, queries, HEADS, levels, POINTS, 2, generator=gen)
    else:
        # Encoder queries are the tokens themselves, in order: the reference
        # point of query i is the centre of token i (cycled if queries > tokens).
        centres = []
        for height, width in shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
            )
            centres.append(torch.stack((xs, ys), dim=-1).reshape(-1, 2))
        reference = torch.cat(centres)[torch.arange(queries) % tokens]
        size_xy = spatial_shapes.flip(-1).float()
        offsets = torch.randn(batch, queries, HEADS, levels, POINTS, 2, generator=gen) * OFFSET_STD_PIXELS
        sampling = reference[None, :, None, None, None, :] + offsets / size_xy[:, None, :]
    weights = torch.randn(batch, queries, HEADS, levels * POINTS, generator=gen).softmax(-1)
    weights = weights.view(batch, queries, HEADS, levels, POINTS)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (value, sampling, weights)]
    return tensors[0], spatial_shapes.to(device), starts.to(device), tensors[1], tensors[2]


def get_method(name):
    from models.ops import ms_deform_attn_pytorch, ms_deform_attn_reference
    from models.ops.cuda_impl import MSDeformAttnCudaFunction, extension_available

    if name == "reference":
        return ms_deform_attn_reference
    if name == "pytorch":
        return ms_deform_attn_pytorch
    if not extension_available():
        raise RuntimeError("CUDA extension not built (models/ops/make.sh)")
    return MSDeformAttnCudaFunction.apply


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * BYTES_PER_KIB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * BYTES_PER_KIB


def reset_peak_rss():
    """Resets the high-water mark; returns False where the kernel can't."""
    try:
        with open(PROC_CLEAR_REFS, "w") as f:
            f.write(RESET_PEAK_RSS)
        return True
    except OSError:
        return False


def run_worker(args):
    """Times one method in this process and prints a JSON line."""
    device = torch.device(args.device)
    shapes = SMALL_SHAPES if args.small else COCO_SHAPES
    batch = SMALL_BATCH if args.small else BATCH
    queries = args.queries or sum(h * w for h, w in shapes)
    inputs = make_inputs(shapes, batch, queries, args.locations, DTYPES[args.dtype], device)
    fn = get_method(args.worker)
    grad_out = torch.randn(batch, queries, HEADS * HEAD_DIM, dtype=DTYPES[args.dtype], device=device)

    def step():
        for t in (inputs[0], inputs[3], inputs[4]):
            t.grad = None
        out = fn(*inputs)
        out.backward(grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocator, lazy initialisation
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss_bytes()
        exact = reset_peak_rss()
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        how = "torch.cuda.max_memory_allocated"
    else:
        peak = peak_rss_bytes() - base
        how = "VmHWM" if exact else "ru_maxrss (includes set-up peak)"
    print(json.dumps({"method": args.worker, "median_s": statistics.median(times), "times": times,
                      "peak_bytes": peak, "memory_probe": how, "queries": queries}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (after one warm-up)")
    parser.add_argument("--queries", type=int, default=0, help="queries per image (default: all encoder tokens)")
    parser.add_argument("--locations", default="encoder", choices=("encoder", "uniform"),
                        help="encoder: points around each token's centre; uniform: anywhere on the map")
    parser.add_argument("--small", action="store_true", help="half-resolution levels and batch 1, for a quick check")
    parser.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--worker", default=None, choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        run_worker(args)
        return

    on_cuda = args.device.startswith("cuda")
    methods = args.methods.split(",") if args.methods else [m for m in METHODS if on_cuda or m != "cuda"]
    shapes = SMALL_SHAPES if args.small else COCO_SHAPES
    print(f"levels {shapes}, batch {SMALL_BATCH if args.small else BATCH}, heads {HEADS}, head_dim {HEAD_DIM}, "
          f"points {POINTS}, queries {args.queries or sum(h * w for h, w in shapes)}, {args.locations} locations, "
          f"{args.dtype} on {args.device}, torch threads {args.threads or torch.get_num_threads()}, "
          f"median of {args.repeats}")
    results = {}
    for method in methods:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", method,
                   "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats),
                   "--queries", str(args.queries), "--locations", args.locations, "--threads", str(args.threads)]
        if args.small:
            command.append("--small")
        proc = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO_ROOT))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            error = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{method:>10}: n/a ({error})")
            continue
        result = json.loads(lines[-1])
        results[method] = result
        runs = ", ".join(f"{t:.3f}" for t in result["times"])
        print(f"{method:>10}: fwd+bwd {result['median_s']:.3f} s (runs {runs}), "
              f"peak extra memory {result['peak_bytes'] / BYTES_PER_MIB:.0f} MiB [{result['memory_probe']}]")
    if "reference" in results:
        for method, result in results.items():
            if method != "reference":
                ratio = results["reference"]["median_s"] / result["median_s"]
                print(f"{method:>10}: {ratio:.2f}x faster than reference")


if __name__ == "__main__":
    main()
