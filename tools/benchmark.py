"""Parameter count, GFLOPs, speed and peak memory of SAM-DETR and DETR configurations.

Examples (every model flag of main.py is accepted and applies to all configurations):
    python tools/benchmark.py --smca --epochs 12 --mode flops            # one image of 800 x 1333
    python tools/benchmark.py --configs smca ms_smca --size 512 683 --device cpu --train --repeats 3
    python tools/benchmark.py --configs default detr dc5 detr_dc5 --mode flops   # SAM-DETR vs DETR
    python tools/benchmark.py --multiscale --smca --mode speed --batch_size 4 --train
    python tools/benchmark.py --amp bf16 --compile --size_divisibility 128 --mode speed --train

Modes: `flops` prints parameters and GFLOPs; `speed` prints parameters, seconds per inference
batch (and with --train per training step), images/s and peak memory; `all` (default) both;
`ops` counts the ATen ops that launch a kernel (all but views) per inference batch and per train
step at batch 2, 96 x 128, next to the official SAM-DETR code's count for single-scale SMCA: on a
GPU a step of this model is bound by launches and host work, so fewer, larger ops make it faster.
--configs names presets (see CONFIG_PRESETS) that are switched on over the command-line flags:
SAM-DETR's switch on --smca, --multiscale and --dilation; "detr" and "detr_dc5" choose
--meta_arch detr (and --dilation), with DETR's defaults for the flags left unset (100 queries).

The speed flags of main.py apply as in training and evaluation, and the header line says how
each ran:
  * --amp bf16|fp16: the inference and train steps run under engine.autocast_context, as
    engine.evaluate and engine.train_step do (fp16 training with main.py's GradScaler). On the
    CPU only bf16 autocasts (fp16 runs in float32, and the header says so).
  * --compile: the timed model is main.compile_model(model, --size_divisibility); the warm-up runs
    (at least COMPILE_WARMUP of them) absorb the compilation. GFLOPs always count the eager model
    (compilation fuses ops, it does not change the count), and `ops` counts the eager model too.
  * --size_divisibility N: the batch is padded to multiples of N as the data loader pads it
    (util.misc.nested_tensor_from_tensor_list), and the model gets that NestedTensor, in every
    mode; the header prints the padded size, at which GFLOPs are counted.

GFLOPs follow fvcore's convention, as the DETR family's tables do: one multiply-add is one FLOP,
and elementwise ops (activations, additions, softmax, the SMCA prior) are not counted. fvcore
leaves these ops out, so they get handles here (per output element unless said otherwise):
  * torchvision roi_align: 4 MACs (one bilinear sample) per sampling point; sampling_ratio**2
    points per bin, or ASSUMED_ROI_SAMPLES_PER_BIN when it is adaptive (sampling_ratio <= 0:
    the real count, ceil(roi side / bin) per axis, depends on the boxes, which a trace cannot see;
    SAM-DETR's boxes mostly span fewer than 7 cells of a stride-32 map, hence one point);
  * multi-scale deformable attention (`ms_deform_attn`, a Python autograd Function, seen by
    the tracer as prim::PythonOp): per batch * query * head * level * point * head channel,
    4 MACs for the bilinear sample and 1 for the attention weight;
  * scaled_dot_product_attention: its two matmuls, Lq * S * (Dq + Dv) per batch and head;
  * grid_sample keeps fvcore's own rule: 4 MACs per output element (bilinear).
DETR needs no handle beyond these (its attention is scaled_dot_product_attention; the rest is
convolutions, linear layers and elementwise ops). The official SAM-DETR README and the DETR paper
(Table 1) average GFLOPs over the first 100 COCO val2017 images (about 800 x 1200 after resizing),
so one 800 x 1333 image counts somewhat more than their figures, which the notes print beside
the count.

Timings are medians over --repeats runs after --warmup runs, synchronising CUDA around each.
A train step is the one of engine.py: forward, criterion, weighted loss sum, backward, gradient
clipping to --clip_max_norm, AdamW step. Inputs are random images of exactly --size (so no
padding unless --size_divisibility asks for it) with NUM_TARGET_BOXES random boxes each; weights
are the random initialisation (ImageNet weights are never downloaded).

Peak memory: on CUDA, torch.cuda.max_memory_allocated minus the memory allocated before the first
measured call. On CPU, the growth of the process's peak resident set (Linux VmHWM, reset through
/proc/self/clear_refs) above its resident set just before the first measured call. Each
(configuration, inference or train) measurement runs in a fresh spawned subprocess, so both
numbers cover activations, workspace, gradients and AdamW state, but not the weights themselves
or the Python/torch runtime. CPU figures are approximate (allocator caching); with --compile the
CPU figure also holds the compiler's own memory, as the warm-up compiles inside the measurement.
"""
import argparse
import copy
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

# Run as a script, python puts tools/ (not the repository root) on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.code_path import gpu_code_path  # noqa: E402
from models.meta_arch import DEFAULT_META_ARCH, apply_meta_arch_defaults, meta_arch  # noqa: E402

COCO_SIZE = (800, 1333)          # default --size: the validation resize of a 4:3 COCO image
NUM_TARGET_BOXES = 5             # random ground-truth boxes per image in a training step
MIN_BOX_SIDE, MAX_BOX_SIDE = 0.05, 0.5  # normalised side lengths of those boxes
INPUT_SEED = 0
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 2
GIGA = 1e9
MEGA = 1e6
MIB = 2 ** 20
KIB = 1024                       # /proc/self/status reports kB
BILINEAR_MACS = 4                # one bilinear sample: four weighted corner reads
ATTENTION_WEIGHT_MACS = 1        # deformable attention: weighting one sample
ASSUMED_ROI_SAMPLES_PER_BIN = 1  # roi_align with adaptive sampling (see the module docstring)
ROI_SAMPLING_RATIO_ARG = 5       # position of sampling_ratio in torchvision::roi_align's schema
CLEAR_REFS_RESET_PEAK = "5"      # writing this to /proc/self/clear_refs resets VmHWM (Linux >= 4.0)
UNCOUNTED_SHOWN = 8              # uncounted op kinds listed after the GFLOPs
COMPILE_WARMUP = 1               # with --compile, at least this many untimed runs: the first one compiles

# The flags a preset may set, and their values when it does not (the command line's defaults).
PRESET_FLAGS: Dict[str, Any] = {"meta_arch": DEFAULT_META_ARCH, "smca": False, "multiscale": False,
                                "dilation": False}
# --configs presets: model flags set over the command line's (see PRESET_FLAGS).
CONFIG_PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "smca": {"smca": True},
    "ms": {"multiscale": True},
    "ms_smca": {"multiscale": True, "smca": True},
    "dc5": {"dilation": True},
    "dc5_smca": {"dilation": True, "smca": True},
    "detr": {"meta_arch": "detr"},
    "detr_dc5": {"meta_arch": "detr", "dilation": True},
}

# Published R50 figures, keyed by (meta_arch, multiscale, dilation): (params M, GFLOPs, source).
README_FIGURES: Dict[Tuple[str, bool, bool], Tuple[int, int, str]] = {
    ("sam_detr", False, False): (58, 100, "official README"),
    ("sam_detr", False, True): (58, 210, "official README"),
    ("sam_detr", True, False): (55, 203, "official README"),
    ("detr", False, False): (41, 86, "DETR paper, Table 1"),
    ("detr", False, True): (41, 187, "DETR paper, Table 1"),
}


# ----------------------------------------------------------------------------- building

def preset_values(args: argparse.Namespace) -> Dict[str, Any]:
    """The PRESET_FLAGS of `args` (meta_arch as build_model reads it, the switches as booleans)."""
    return {flag: meta_arch(args) if flag == "meta_arch" else bool(getattr(args, flag)) for flag in PRESET_FLAGS}


def config_name(args: argparse.Namespace) -> str:
    """Short name of a configuration: its preset name when it is one of CONFIG_PRESETS."""
    values = preset_values(args)
    for name, preset in CONFIG_PRESETS.items():
        if values == {**PRESET_FLAGS, **preset}:
            return name
    return "custom"


def with_preset(args: argparse.Namespace, preset: str) -> argparse.Namespace:
    """A copy of `args` with the preset's flags set, and the defaults of its architecture filled
    into the flags left unset. `args` should be as parsed (parse_raw): flags filled with another
    architecture's defaults would count as given. Flags the architecture cannot use stop the run."""
    if preset not in CONFIG_PRESETS:
        raise ValueError(f"unknown config {preset!r}; choose from {', '.join(CONFIG_PRESETS)}")
    out = copy.copy(args)
    for key, value in CONFIG_PRESETS[preset].items():
        setattr(out, key, value)
    try:
        apply_meta_arch_defaults(out)
    except ValueError as error:
        raise SystemExit(f"--configs {preset}: {error}") from None
    return out


def build(args: argparse.Namespace) -> Tuple[nn.Module, nn.Module]:
    """(model, criterion) of this repository for `args`, on args.device, never downloading weights."""
    from models import build_model  # imported here so the timing helpers work for any DETR-like model
    args = copy.copy(args)
    args.pretrained_backbone = False  # random weights time and count like trained ones
    torch.manual_seed(INPUT_SEED)
    model, criterion, _ = build_model(args)
    return model.to(args.device), criterion.to(args.device)


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW over main.py's parameter groups, fused as main.py has it."""
    from main import FUSED_ADAMW_DEVICES, param_groups
    fused = torch.device(args.device).type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay, fused=fused)


def called_model(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The model as main.py calls it: main.compile_model(model, --size_divisibility) with --compile,
    else `model` itself (parameters and train/eval switches are shared either way)."""
    if not args.compile:
        return model
    import main  # looked up at call time, so that tests can watch it
    return main.compile_model(model, args.size_divisibility)


def grad_scaler(device: torch.device, amp: Optional[str]) -> Optional[torch.amp.GradScaler]:
    """main.py's gradient scaler: fp16 training on CUDA needs one; bf16 and float32 do not."""
    if amp == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def autocast_runs(device: torch.device, amp: Optional[str]) -> bool:
    """Whether --amp autocasts on `device`: asks engine.autocast_context itself."""
    import engine
    return isinstance(engine.autocast_context(device, amp), torch.autocast)


def precision_name(device: torch.device, amp: Optional[str]) -> str:
    """The precision the steps actually run in, for the header."""
    if not autocast_runs(device, amp):
        if amp == "bf16" and device.type == "cpu":
            return "float32 (--amp bf16: this CPU has no bfloat16 units, see engine.cpu_has_bf16)"
        return "float32" if not amp else f"float32 (--amp {amp} applies on CUDA, and bf16 on the CPU)"
    return f"{amp} autocast" + (" with a gradient scaler" if grad_scaler(device, amp) is not None else "")


def warmup_runs(args: argparse.Namespace) -> int:
    """--warmup, raised to COMPILE_WARMUP with --compile so that no timed run compiles."""
    return max(args.warmup, COMPILE_WARMUP) if args.compile else args.warmup


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def synthetic_batch(batch_size: int, size: Sequence[int], num_classes: int, device: str,
                    seed: int = INPUT_SEED) -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    """Random normalised images (3, H, W) and targets with NUM_TARGET_BOXES boxes each."""
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    images = [torch.randn(3, height, width, generator=gen).to(device) for _ in range(batch_size)]
    targets = []
    for _ in range(batch_size):
        wh = MIN_BOX_SIDE + (MAX_BOX_SIDE - MIN_BOX_SIDE) * torch.rand(NUM_TARGET_BOXES, 2, generator=gen)
        centre = wh / 2 + (1 - wh) * torch.rand(NUM_TARGET_BOXES, 2, generator=gen)
        labels = torch.randint(1, num_classes, (NUM_TARGET_BOXES,), generator=gen)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, wh], 1).to(device)})
    return images, targets


def padded_samples(images: List[Tensor], size_divisibility: int):
    """The batch as the data loader's collate_fn pads it: a NestedTensor of (B, 3, H', W'), H' and
    W' the largest image's sides rounded up to multiples of `size_divisibility`, and its mask."""
    from util.misc import nested_tensor_from_tensor_list
    return nested_tensor_from_tensor_list(images, size_divisibility)


def padded_size(size: Sequence[int], size_divisibility: int) -> Tuple[int, int]:
    """(H', W') of an image of `size` (H, W) after padded_samples."""
    from util.misc import round_up
    height, width = size
    return round_up(height, size_divisibility), round_up(width, size_divisibility)


# ----------------------------------------------------------------------------- FLOPs

def _shape(value: Any) -> List[int]:
    from fvcore.nn.jit_handles import get_shape
    return get_shape(value)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _constant(value: Any) -> Optional[Any]:
    """The Python value of a traced constant input, or None when it is not a constant."""
    try:
        return value.toIValue()
    except (AttributeError, RuntimeError):
        return None


def roi_align_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """4 MACs per bilinear sampling point; sampling_ratio**2 points per output bin."""
    ratio = _constant(inputs[ROI_SAMPLING_RATIO_ARG]) if len(inputs) > ROI_SAMPLING_RATIO_ARG else None
    samples = ratio * ratio if isinstance(ratio, int) and ratio > 0 else ASSUMED_ROI_SAMPLES_PER_BIN
    return _numel(_shape(outputs[0])) * samples * BILINEAR_MACS


def ms_deform_attn_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """value (N, S, M, D), locations (N, Lq, M, L, P, 2): N*Lq*M*L*P*D * (4 bilinear + 1 weight)."""
    value, locations = _shape(inputs[0]), _shape(inputs[3])
    return _numel(locations[:-1]) * value[-1] * (BILINEAR_MACS + ATTENTION_WEIGHT_MACS)


def sdpa_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """q (..., Lq, Dq), k (..., S, Dq), v (..., S, Dv): q @ k^T and attn @ v."""
    q, k, v = (_shape(x) for x in inputs[:3])
    out = _shape(outputs[0])  # carries the broadcast batch and head dims
    keys = k[-2]
    return _numel(out[:-1]) * keys * (q[-1] + v[-1])


# The tracer names a Python autograd Function "prim::PythonOp.<class name>".
FLOP_HANDLES: Dict[str, Callable[[List[Any], List[Any]], int]] = {
    "torchvision::roi_align": roi_align_flops,
    "aten::scaled_dot_product_attention": sdpa_flops,
    "prim::PythonOp._SparseSamplingFunction": ms_deform_attn_flops,    # models.ops, PyTorch path
    "prim::PythonOp.MSDeformAttnCudaFunction": ms_deform_attn_flops,   # models.ops, CUDA kernels
    "prim::PythonOp.MSDeformAttnFunction": ms_deform_attn_flops,       # Deformable DETR's own op
}


def count_flops(model: nn.Module, image: Tensor) -> Tuple[float, Dict[str, float], Dict[str, int]]:
    """(GFLOPs, GFLOPs by operator, uncounted op kinds -> occurrences) of one eval forward."""
    was_training = model.training
    model.eval()
    try:
        # the model's own ops (the CPU's separable RoIAlign would count other matmuls)
        with torch.no_grad(), warnings.catch_warnings(), gpu_code_path():
            warnings.simplefilter("ignore")  # fvcore's and the tracer's deprecation and trace warnings
            from fvcore.nn import FlopCountAnalysis
            analysis = FlopCountAnalysis(model, ([image],)).set_op_handle(**FLOP_HANDLES)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = analysis.total()
            by_op = {k: v / GIGA for k, v in analysis.by_operator().items()}
            uncounted = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    return total / GIGA, by_op, uncounted


# ----------------------------------------------------------------------------- speed and memory

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int,
               device: torch.device) -> Tuple[List[float], List[float]]:
    """(wall seconds, process CPU seconds) of each of `repeats` calls of `fn`, after `warmup` calls.

    CPU seconds (all threads of this process) are reported because on a shared machine they
    move much less with other processes' load than wall time does.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def inference_step(model: nn.Module, samples: Any, device: torch.device, amp: Optional[str] = None,
                   grad_mode: Callable[[], Any] = torch.inference_mode) -> Callable[[], Any]:
    """One eval forward of `samples` (a NestedTensor (B, 3, H, W) or a list of (3, H, W) images)
    without autograd, under engine.autocast_context as engine.evaluate runs it, as a closure."""
    import engine
    model.eval()

    def step() -> Any:
        with grad_mode(), engine.autocast_context(device, amp):
            return model(samples)
    return step


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, samples: Any,
               targets: List[Dict[str, Tensor]], clip_max_norm: float, device: torch.device,
               amp: Optional[str] = None, scaler: Optional[torch.amp.GradScaler] = None) -> Callable[[], float]:
    """engine.train_step as a closure: forward (autocast with --amp), losses, backward (scaled with
    `scaler`), clipping, optimizer step. samples: a NestedTensor (B, 3, H, W), as the loader gives."""
    import engine
    model.train()
    criterion.train()

    def step() -> float:
        return engine.train_step(model, criterion, samples, targets, optimizer, device, clip_max_norm,
                                 amp=amp, scaler=scaler)["loss"]
    return step


# Kernel-launching ATen ops per step of the official code, single-scale SMCA, batch 2, 96 x 128,
# counted the same way on the CPU (its CPU optimizer's per-parameter scalar reads left out).
OFFICIAL_OPS = {"inference": 1769, "train": 5444}
OPS_SIZE, OPS_BATCH = (96, 128), 2
# ops that only make a new view of the same storage launch no kernel on a GPU
VIEW_OPS = frozenset({"view", "t", "transpose", "select", "slice", "unsqueeze", "squeeze", "_unsafe_view",
                      "detach", "expand", "permute", "as_strided", "alias", "unbind", "split", "split_with_sizes",
                      "chunk", "narrow", "diagonal", "unflatten", "_reshape_alias", "view_as_real", "lift_fresh",
                      "unfold"})


def count_ops(step: Callable[[], Any]) -> int:
    """Non-view ATen ops dispatched by one call of `step` (a proxy for CUDA kernel launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket).replace("aten.", "") not in VIEW_OPS:
                Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        step()
    return Counter.count


def op_counts(args: argparse.Namespace) -> Dict[str, int]:
    """Ops per inference batch and per train step at OPS_SIZE, OPS_BATCH (after one warm-up each),
    padded to --size_divisibility and under --amp; always the eager model (a compiled one fuses
    ops in code the counter does not see)."""
    device = torch.device(args.device)
    model, criterion = build(args)
    images, targets = synthetic_batch(OPS_BATCH, OPS_SIZE, criterion.num_classes, args.device)
    samples = padded_samples(images, args.size_divisibility)
    counts = {}
    for phase in ("inference", "train"):
        if phase == "inference":
            # no_grad rather than inference_mode: under inference_mode the counter sees composite
            # ops (linear, flatten) before they decompose into the ops that launch kernels
            step = inference_step(model, samples, device, args.amp, grad_mode=torch.no_grad)
        else:
            step = train_step(model, criterion, build_optimizer(model, args), samples, targets, args.clip_max_norm,
                              device, args.amp, grad_scaler(device, args.amp))
        with gpu_code_path():  # the ops of the GPU code path
            step()
            counts[phase] = count_ops(step)
    return counts


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Dict[str, float]]:
    """Yields a dict that gets `peak_mib`: the peak memory growth inside the block (see module docs)."""
    result: Dict[str, float] = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / MIB
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write(CLEAR_REFS_RESET_PEAK)
        before = _proc_status_kib("VmRSS")
    except OSError:  # not Linux: no peak to read
        yield result
        result["peak_mib"] = float("nan")
        return
    yield result
    result["peak_mib"] = (_proc_status_kib("VmHWM") - before) * KIB / MIB


def measure(step: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> Dict[str, float]:
    """Median wall and CPU seconds per call, and peak memory growth (warm-up included: the first
    calls allocate)."""
    with peak_memory(device) as mem:
        wall, cpu = time_calls(step, repeats, warmup, device)
    return {"seconds": statistics.median(wall), "cpu_seconds": statistics.median(cpu),
            "peak_mib": mem["peak_mib"], "times": wall, "cpu_times": cpu}


def measure_config(args: argparse.Namespace, phase: str) -> Dict[str, float]:
    """Builds the model of `args` and measures one phase, "inference" or "train"."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if phase not in ("inference", "train"):
        raise ValueError(f"phase must be inference or train, got {phase!r}")
    device = torch.device(args.device)
    model, criterion = build(args)
    images, targets = synthetic_batch(args.batch_size, args.size, criterion.num_classes, args.device)
    samples = padded_samples(images, args.size_divisibility)
    called = called_model(model, args)
    if phase == "inference":
        step = inference_step(called, samples, device, args.amp)
    else:
        step = train_step(called, criterion, build_optimizer(model, args), samples, targets, args.clip_max_norm,
                          device, args.amp, grad_scaler(device, args.amp))
    result = measure(step, args.repeats, warmup_runs(args), device)
    result["images_per_s"] = args.batch_size / result["seconds"]
    return result


def measure_isolated(args: argparse.Namespace, phase: str) -> Dict[str, float]:
    """measure_config in a fresh spawned process, so its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_config, args, phase).result()


# ----------------------------------------------------------------------------- report

def benchmark_config(args: argparse.Namespace) -> Dict[str, Any]:
    """Parameters, and per --mode the GFLOPs and the speed of one configuration."""
    row: Dict[str, Any] = {"config": config_name(args)}
    model, _ = build(args)
    row["params"], row["trainable"] = count_parameters(model)
    if args.mode in ("flops", "all"):
        # the eager model on the padded image: FLOPs follow the shapes, not the mask
        image = torch.randn(3, *args.size, generator=torch.Generator().manual_seed(INPUT_SEED)).to(args.device)
        padded = padded_samples([image], args.size_divisibility).tensors[0]
        row["gflops"], row["gflops_by_op"], row["uncounted"] = count_flops(model, padded)
    del model
    if args.mode in ("speed", "all"):
        run = measure_isolated if args.isolate else measure_config
        row["inference"] = run(args, "inference")
        if args.train:
            row["train"] = run(args, "train")
    return row


def _fmt(value: Optional[float], spec: str) -> str:
    """`value` formatted by `spec` ("8.3f"), or a dash of the same width when there is none."""
    if value is None:
        return format("-", ">" + spec.split(".")[0])
    return format(value, spec)


def format_table(rows: List[Dict[str, Any]]) -> str:
    """One line per configuration: params, GFLOPs, then per phase the median wall seconds, the
    median process CPU seconds, images/s (from wall time) and peak memory growth in MiB."""
    phase_header = f"{'wall s':>8} {'cpu s':>8} {'img/s':>6} {'peak MiB':>8}"
    header = (f"{'config':<10} {'params':>11} {'trainable':>11} {'GFLOPs':>7} | inference: {phase_header} | "
              f"train step: {phase_header}")
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for phase in ("inference", "train"):
            m = row.get(phase, {})
            cells.append(f"{_fmt(m.get('seconds'), '8.3f')} {_fmt(m.get('cpu_seconds'), '8.3f')} "
                         f"{_fmt(m.get('images_per_s'), '6.2f')} {_fmt(m.get('peak_mib'), '8.0f')}")
        lines.append(f"{row['config']:<10} {row['params']:>11,} {row['trainable']:>11,} "
                     f"{_fmt(row.get('gflops'), '7.1f')} | {'':>10} {cells[0]} | {'':>11} {cells[1]}")
    return "\n".join(lines)


def format_flop_notes(rows: List[Dict[str, Any]], args_list: List[argparse.Namespace]) -> str:
    """GFLOPs by operator, what stayed uncounted, and the README's figure for comparison."""
    lines = []
    for row, args in zip(rows, args_list):
        if "gflops" not in row:
            continue
        by_op = ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["gflops_by_op"].items(), key=lambda kv: -kv[1]))
        uncounted = sorted(row["uncounted"].items(), key=lambda kv: -kv[1])[:UNCOUNTED_SHOWN]
        lines.append(f"{row['config']}: GFLOPs by op: {by_op}")
        lines.append("  uncounted (elementwise, by fvcore's convention): "
                     + ", ".join(f"{k} x{n}" for k, n in uncounted))
        figures = README_FIGURES.get((meta_arch(args), bool(args.multiscale), bool(args.dilation)))
        if figures and args.backbone == "resnet50":
            params, gflops, source = figures
            height, width = padded_size(args.size, args.size_divisibility)
            lines.append(f"  {source}: {params}M params, {gflops} GFLOPs (average of the first 100 val2017 "
                         f"images, about 800 x 1200); this count: {row['trainable'] / MEGA:.1f}M trainable "
                         f"params, {row['gflops']:.0f} GFLOPs on one {height} x {width} image")
    return "\n".join(lines)


def flags_in_effect(args: argparse.Namespace, size: Sequence[int]) -> str:
    """The speed flags as they ran, for the header: precision, compilation, padding of `size`."""
    height, width = size
    padded = padded_size(size, args.size_divisibility)
    padding = (f"size_divisibility {args.size_divisibility}: {height} x {width} padded to {padded[0]} x {padded[1]}"
               if tuple(padded) != (height, width) else f"size_divisibility {args.size_divisibility} (no padding)")
    return (f"precision {precision_name(torch.device(args.device), args.amp)}, "
            f"compile {'on' if args.compile else 'off'}, {padding}")


def format_header(args: argparse.Namespace, load: Tuple[float, float]) -> str:
    """The line above the table: device, sizes, the speed flags in effect, timing and load (before, after)."""
    padded = tuple(padded_size(args.size, args.size_divisibility)) != tuple(args.size)
    gflops_note = f"GFLOPs: one {'padded ' if padded else ''}image{', eager model' if args.compile else ''}"
    warmup = warmup_runs(args)
    compiling = " (compilation included)" if args.compile else ""
    return (f"device {args.device}, threads {torch.get_num_threads()}, size {args.size[0]} x {args.size[1]}, "
            f"batch {args.batch_size} ({gflops_note}), {flags_in_effect(args, args.size)}, "
            f"median of {args.repeats} after {warmup} warm-up{compiling}, "
            f"load average {load[0]:.2f} -> {load[1]:.2f}")


def get_parser() -> argparse.ArgumentParser:
    from main import get_args_parser
    parser = argparse.ArgumentParser("SAM-DETR / DETR benchmark", parents=[get_args_parser()],
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=list(COCO_SIZE), metavar=("H", "W"),
                        help="input image height and width")
    parser.add_argument("--mode", choices=("flops", "speed", "ops", "all"), default="all",
                        help="ops: kernel-launching ATen ops per inference batch and train step")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed runs (the median is shown)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed runs before timing")
    parser.add_argument("--train", action="store_true", help="also time a full training step")
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIG_PRESETS),
                        help="presets to compare in one table (switched on over the other flags)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no_isolate", dest="isolate", action="store_false",
                        help="measure speed in this process (peak memory then mixes configurations)")
    return parser


def parse_raw(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line as parsed, the device filled in; the architecture's defaults not yet."""
    args = get_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    return args


def checked(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` through main.py's checks and notes (--amp off CUDA, --size_divisibility >= 1,
    the flags --meta_arch refuses), with its architecture's defaults filled in."""
    from main import check_args
    out = copy.copy(args)
    check_args(out)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line's configuration, ready to build."""
    return checked(parse_raw(argv))


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    raw = parse_raw(argv)
    args = checked(raw)
    if args.threads:
        torch.set_num_threads(args.threads)
    # presets start from the flags as given, so that each gets its own architecture's defaults
    args_list = [with_preset(raw, c) for c in args.configs] if args.configs else [args]
    if args.mode == "ops":
        eager = "; ops mode counts the eager model" if args.compile else ""
        ops_height, ops_width = padded_size(OPS_SIZE, args.size_divisibility)
        print(f"device {args.device}, {flags_in_effect(args, OPS_SIZE)}{eager}")
        for a in args_list:
            counts = op_counts(a)
            print(f"{config_name(a)}: non-view ATen ops per step (batch {OPS_BATCH}, {ops_height} x {ops_width}): "
                  + ", ".join(f"{phase} {n} ({n / OFFICIAL_OPS[phase]:.2f}x the official SAM-DETR single-scale "
                              f"SMCA's {OFFICIAL_OPS[phase]})" for phase, n in counts.items()))
        return []
    load_before = os.getloadavg()
    rows = [benchmark_config(a) for a in args_list]
    load_after = os.getloadavg()
    print(format_header(args, (load_before[0], load_after[0])))
    print(format_table(rows))
    notes = format_flop_notes(rows, args_list)
    if notes:
        print(notes)
    return rows


if __name__ == "__main__":
    main()
