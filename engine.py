"""One training epoch and one evaluation pass."""
import math
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

import util.misc as utils
from datasets.coco_eval import CocoEvaluator, per_class_ap, per_class_table
from models.criterion import NumBoxes, logged_names
from util.misc import NonFiniteLossError  # noqa: F401 (engine.NonFiniteLossError is public)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# torch.cpu.get_capabilities() names of the units that compute in bfloat16 (x86: AVX512-BF16, AMX;
# ARM: BF16, SVE-BF16). Without them bfloat16 is emulated, slower than float32 (inference at 800x1216
# took 14x as long on an AVX2-only machine), so --amp bf16 runs float32 there.
CPU_BF16_UNITS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
CPU_VECTOR_UNITS = ("avx512_f", "avx2", "avx", "sve", "neon")  # the widest one names a CPU that has none
UNSCALED = "_unscaled"  # suffix of the logged raw loss terms


# what a NonFiniteLossError in training adds to its message
STOPPED = "training stopped before the optimizer step: no weight changed and no checkpoint was written"


def autocast_runs(device: torch.device, amp: Optional[str]) -> bool:
    """Whether --amp autocasts on `device`: bf16 and fp16 on CUDA, bf16 on a CPU with bfloat16
    units (see cpu_has_bf16; CPU fp16 autocast has no such gain)."""
    return bool(amp) and (device.type == "cuda" or (device.type == "cpu" and amp == "bf16" and cpu_has_bf16()))


def autocast_context(device: torch.device, amp: Optional[str]):
    """Mixed precision for --amp where it runs (see autocast_runs); a no-op otherwise. Losses and
    matching run in float32 either way (float_outputs)."""
    if not autocast_runs(device, amp):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def cpu_bf16_units() -> Tuple[str, ...]:
    """The bfloat16 units of this CPU that PyTorch detects (CPU_BF16_UNITS present), e.g. ("avx512_bf16",)."""
    capabilities = torch.cpu.get_capabilities()
    return tuple(unit for unit in CPU_BF16_UNITS if capabilities.get(unit))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 (AVX512-BF16 / AMX, ARM BF16): only there does
    --amp bf16 autocast, elsewhere it would run slower than float32."""
    return bool(cpu_bf16_units())


def cpu_description() -> str:
    """This CPU in a few words, for the note of a CPU without bfloat16 units: "AMD EPYC, x86_64, avx2"."""
    capabilities = torch.cpu.get_capabilities()
    widest = next((unit for unit in CPU_VECTOR_UNITS if capabilities.get(unit)), "no vector units")
    parts = (capabilities.get("cpu_name"), capabilities.get("architecture"), widest)
    return ", ".join(str(part) for part in parts if part)


def amp_note(device: torch.device, amp: Optional[str]) -> Optional[str]:
    """What --amp does on `device` when that is not plain autocast, for one line at start-up."""
    if not amp or autocast_runs(device, amp):
        return None
    if device.type == "cpu" and amp == "bf16":
        return (f"--amp bf16: this CPU ({cpu_description()}) has no bfloat16 units (none of "
                f"{', '.join(CPU_BF16_UNITS)} detected), where bfloat16 runs slower than float32: "
                f"running in float32")
    return f"--amp {amp} applies on CUDA (and bf16 on the CPU); running in float32 on {device.type}"


def float_outputs(outputs):
    """Losses and matching run in float32 whatever precision the model ran in."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: float_outputs(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [float_outputs(v) for v in outputs]
    return outputs


def _to_device(samples, targets, device):
    samples = samples.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return samples, targets


def compute_losses(model, criterion, samples, targets, device, amp: Optional[str],
                   num_boxes: Optional[NumBoxes] = None):
    """-> (weighted total loss, per-layer loss terms (see SetCriterion.layer_losses), outputs).
    num_boxes: the loss normaliser (None: counted from `targets`; see train_step)."""
    with autocast_context(device, amp):
        outputs = model(samples)
    layer_losses = criterion.layer_losses(float_outputs(outputs), targets, num_boxes=num_boxes)
    return criterion.weighted_total(layer_losses), layer_losses, outputs


Batch = Tuple[Any, List[Dict[str, torch.Tensor]]]  # (samples: NestedTensor (B, 3, H, W), B targets)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """DistributedDataParallel's no_sync() where `sync` is False: the backward pass of a micro-batch
    that is not its step's last only accumulates, the last one all-reduces the sum. A no-op for a
    model that is not DDP-wrapped (a compiled DDP model forwards no_sync to it)."""
    return nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


def micro_batch_mean(parts: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The mean of every (detached) loss term over a step's micro-batches: with each normalised by
    the step's boxes per virtual process, what LossRead's mean over that many processes would log."""
    if len(parts) == 1:
        return parts[0]
    return {name: torch.stack([part[name] for part in parts]).mean(0) for name in parts[0]}


class LossRead:
    """Every logged loss value of a step, all-reduced over processes and copied to the host in one
    transfer that is started now and awaited by `values()`.

    values() -> {name: float} with the raw terms as `<name>_unscaled`, the weighted ones under
    their own name, class_error, and `loss`, the weighted sum.
    """

    def __init__(self, layer_losses: Dict[str, torch.Tensor], weights: Dict[str, float]):
        self.names = logged_names(layer_losses)
        self.weights = weights
        flat = torch.cat([v.detach().float().reshape(-1) for v in layer_losses.values()])
        world_size = utils.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(flat)
            flat = flat / world_size
        self._copy = utils.HostCopy(flat)

    def values(self) -> Dict[str, float]:
        raw = dict(zip(self.names, self._copy.wait().tolist()))
        scaled = {k: v * self.weights[k] for k, v in raw.items() if k in self.weights}
        return {"loss": sum(scaled.values()), **scaled, **{f"{k}{UNSCALED}": v for k, v in raw.items()},
                "class_error": raw.get("class_error", 0.0)}


def train_step(model, criterion, samples, targets, optimizer, device: torch.device, max_norm: float = 0,
               amp: Optional[str] = None, scaler: Optional[torch.amp.GradScaler] = None,
               where: str = "", more_micro_batches: Sequence[Batch] = ()) -> Dict[str, float]:
    """Forward, losses, backward and optimizer step; returns the logged values (see LossRead).

    samples, targets: the step's batch, or with gradient accumulation (--accum_steps K) its first
    micro-batch; more_micro_batches: the step's other K - 1 micro-batches, (samples, targets) each.
    Each micro-batch stands for one of K x W processes (datasets.sampling.MicroBatchSampler): its
    loss is normalised by the boxes of the step's whole global batch per virtual process, counted
    before the first forward pass, and scaled by 1 / K, so that the summed gradient, averaged over
    the W processes by DDP, is the gradient that K x W processes' DDP would average. Clipping, the
    non-finite checks and the optimizer step happen once, after the last micro-batch; the logged
    values are the micro-batches' mean.

    Host-device round trips: the matcher's cost matrices (once per micro-batch), and the logged
    loss values (once per step), read while the last backward pass runs (its kernels are queued
    first) and before the optimizer step, so that non-finite outputs (seen by the matcher) or a
    non-finite loss stop training with NonFiniteLossError before any weight changes.
    """
    micro_batches = [(samples, targets), *more_micro_batches]
    accum_steps = len(micro_batches)
    num_boxes = criterion.num_boxes([t for _, batch_targets in micro_batches for t in batch_targets], device,
                                    micro_batches=accum_steps)
    optimizer.zero_grad(set_to_none=True)
    parts = []
    for index, (micro_samples, micro_targets) in enumerate(micro_batches):
        last = index == accum_steps - 1
        with gradient_sync(model, sync=last):
            try:
                losses, layer_losses, _ = compute_losses(model, criterion, micro_samples, micro_targets, device, amp,
                                                         num_boxes=num_boxes)
            except NonFiniteLossError as error:  # the matcher found non-finite outputs
                raise NonFiniteLossError(f"{error}{where}; {STOPPED}") from None
            # detached: the graphs of earlier micro-batches are freed by their backward pass
            parts.append({name: value.detach() for name, value in layer_losses.items()})
            if last:
                read = LossRead(micro_batch_mean(parts), criterion.weight_dict)
            losses = losses / accum_steps
            if scaler is not None:
                scaler.scale(losses).backward()
            else:
                losses.backward()
    logged = read.values()
    if not math.isfinite(logged["loss"]):
        terms = ", ".join(f"{k.removesuffix(UNSCALED)}={v:.4g}" for k, v in logged.items() if k.endswith(UNSCALED))
        raise NonFiniteLossError(f"loss is {logged['loss']}{where}; {STOPPED}. Loss terms: {terms}")
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return logged


class CollectiveTimeoutError(RuntimeError):
    """A collective (gradient all-reduce, preemption poll) waited longer than --dist_timeout: a peer
    hung or died. The process exits, so that torchrun's --max-restarts or slurm can restart the group."""


# how the backends word a collective that waited too long (gloo: "Timed out waiting 6000ms for recv
# operation"; NCCL: "Watchdog caught collective operation timeout ... before timing out")
TIMEOUT_WORDS = ("timed out waiting", "operation timeout", "before timing out")


def is_collective_timeout(error: BaseException) -> bool:
    """Whether `error` says that a collective waited too long, in the backends' own words (gloo raises
    a plain RuntimeError); never a CUDA error such as "the launch timed out and was terminated"."""
    return any(words in str(error).lower() for words in TIMEOUT_WORDS)


@contextmanager
def collective_timeouts_named(epoch: int, step: int):
    """Re-raises a distributed timeout as CollectiveTimeoutError naming this rank, the epoch and the step."""
    try:
        yield
    except RuntimeError as error:
        if not utils.is_dist_avail_and_initialized() or not is_collective_timeout(error):
            raise
        raise CollectiveTimeoutError(
            f"rank {utils.get_rank()} of {utils.get_world_size()}: a collective at epoch {epoch}, step {step} waited "
            f"longer than --dist_timeout (a peer process hung or died); exiting so that the job can be restarted "
            f"(torchrun --max-restarts, or a slurm requeue) and resume from its last checkpoint. The backend said: "
            f"{str(error).splitlines()[0]}") from error


def optimizer_steps(data_loader: Iterable, accum_steps: int = 1) -> int:
    """Optimizer steps of one pass over `data_loader`, `accum_steps` of its batches each (an
    incomplete last group is dropped)."""
    return len(data_loader) // accum_steps


class StepBatches:
    """`data_loader`'s batches, `accum_steps` at a time: a list of micro-batches per optimizer step,
    all of them loaded before the step starts (its loss normaliser counts their boxes)."""

    def __init__(self, data_loader: Iterable, accum_steps: int = 1):
        self.data_loader, self.accum_steps = data_loader, accum_steps

    def __len__(self) -> int:
        return optimizer_steps(self.data_loader, self.accum_steps)

    def __iter__(self) -> Iterator[List[Batch]]:
        group = []
        for batch in self.data_loader:
            group.append(batch)
            if len(group) == self.accum_steps:
                yield group
                group = []


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    max_norm: float = 0, print_freq: int = 100, amp: Optional[str] = None,
                    scaler: Optional[torch.amp.GradScaler] = None, control=None,
                    progress_bar: bool = False, tb_writer=None, global_step: int = 0, accum_steps: int = 1):
    """Trains for one pass over `data_loader`, one optimizer step per `accum_steps` of its batches
    (micro-batches of gradient accumulation, see train_step); steps, logging and TensorBoard count
    optimizer steps.

    control: optional util.step_control.StepControl, told after every optimizer step (mid-epoch
    checkpoints, preemption); when it says stop, the epoch ends early and the returned stats carry
    `interrupted_after` = the number of steps done. Returns the epoch's averaged meters.
    """
    model.train()
    criterion.train()
    logger = utils.MetricLogger(delimiter="  ", progress_bar=progress_bar)
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("class_error", utils.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    steps = 0
    step_batches = StepBatches(data_loader, accum_steps)
    for micro_batches in logger.log_every(step_batches, print_freq, f"Epoch: [{epoch}]"):
        (samples, targets), *more = [_to_device(s, t, device) for s, t in micro_batches]
        with collective_timeouts_named(epoch, steps):
            logged = train_step(model, criterion, samples, targets, optimizer, device, max_norm, amp, scaler,
                                where=f" at epoch {epoch}, step {steps}", more_micro_batches=more)
        steps += 1
        logger.update(**logged)
        logger.update(lr=optimizer.param_groups[0]["lr"])
        if tb_writer is not None:
            tb_writer.add_scalar("train/loss", logged["loss"], global_step + steps)
        with collective_timeouts_named(epoch, steps - 1):
            stop = control is not None and control.after_step(steps)
        if stop:
            print(f"Stopping epoch {epoch} after {steps} steps on request.", flush=True)
            break
    logger.synchronize_between_processes()
    print("Averaged stats:", logger, flush=True)
    stats = {k: meter.global_avg for k, meter in logger.meters.items()}
    if control is not None and steps < len(step_batches):
        stats["interrupted_after"] = steps
    return stats


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, output_dir="",
             print_freq: int = 100, amp: Optional[str] = None, progress_bar: bool = False):
    """Eval losses plus COCO box AP, overall and per category (see per_class_ap; printed as a table).
    Returns (stats, coco_evaluator); stats['per_class'] = per_class_ap's {category id: row}."""
    model.eval()
    criterion.eval()
    logger = utils.MetricLogger(delimiter="  ", progress_bar=progress_bar)
    logger.add_meter("class_error", utils.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    coco_evaluator = CocoEvaluator(base_ds, ("bbox",))
    for samples, targets in logger.log_every(data_loader, print_freq, "Test:"):
        samples, targets = _to_device(samples, targets, device)
        _, layer_losses, outputs = compute_losses(model, criterion, samples, targets, device, amp)
        logger.update(**LossRead(layer_losses, criterion.weight_dict).values())
        orig_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        results = postprocessors["bbox"](float_outputs(outputs), orig_sizes)
        coco_evaluator.update({t["image_id"].item(): r for t, r in zip(targets, results)})
    logger.synchronize_between_processes()
    print("Averaged stats:", logger, flush=True)
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.accumulate()
    coco_evaluator.summarize()
    per_class = per_class_ap(coco_evaluator.coco_eval["bbox"])
    if per_class:
        print(per_class_table(per_class), flush=True)  # print() is silenced on all but the main process
    stats = {k: meter.global_avg for k, meter in logger.meters.items()}
    stats["coco_eval_bbox"] = coco_evaluator.coco_eval["bbox"].stats.tolist()
    stats["per_class"] = per_class  # logged as test_per_class
    return stats, coco_evaluator


COCO_MAX_DETECTIONS = 100  # detections per image the COCO evaluation server reads


def coco_results(image_id: int, result: Dict[str, torch.Tensor], limit: int = COCO_MAX_DETECTIONS) -> list:
    """One image's post-processed detections (scores, labels, boxes xyxy in original pixels) ->
    its best `limit` as COCO results entries: image_id, category_id, bbox [x, y, w, h], score."""
    scores, order = result["scores"].float().cpu().sort(descending=True)
    scores, order = scores[:limit], order[:limit]
    labels = result["labels"].cpu()[order]
    boxes = result["boxes"].float().cpu()[order]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    return [{"image_id": image_id, "category_id": int(c), "bbox": [round(v, 2) for v in b], "score": round(s, 5)}
            for c, b, s in zip(labels.tolist(), xywh.tolist(), scores.tolist())]


@torch.no_grad()
def detect(model, postprocessors, data_loader, device, amp: Optional[str] = None, print_freq: int = 100,
           progress_bar: bool = False) -> list:
    """Detections for every image of `data_loader` (no annotations needed, as for COCO test-dev),
    gathered from all processes to the first: COCO results entries, image by image in id order, best
    first ([] on the other processes)."""
    model.eval()
    logger = utils.MetricLogger(delimiter="  ", progress_bar=progress_bar)
    per_image: Dict[int, list] = {}
    for samples, targets in logger.log_every(data_loader, print_freq, "Test-dev:"):
        samples = samples.to(device, non_blocking=True)
        with autocast_context(device, amp):
            outputs = model(samples)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        for t, r in zip(targets, postprocessors["bbox"](float_outputs(outputs), orig_sizes)):
            per_image[int(t["image_id"])] = coco_results(int(t["image_id"]), r)
    # a distributed sampler repeats a few images to even out the processes: keyed by image, kept once
    merged: Dict[int, list] = {}
    for part in utils.gather_to_main(per_image):
        merged.update(part)
    return [entry for image_id in sorted(merged) for entry in merged[image_id]]
