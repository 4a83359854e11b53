"""One training epoch and one evaluation pass."""
import math
from contextlib import nullcontext
from typing import Dict, Iterable, Optional

import torch

import util.misc as utils
from datasets.coco_eval import CocoEvaluator

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised before the optimizer step, so no checkpoint is touched."""


def autocast_context(device: torch.device, amp: Optional[str]):
    """Mixed precision on CUDA for --amp bf16/fp16; a no-op otherwise."""
    if not amp or device.type != "cuda":
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[amp])


def _float_outputs(outputs):
    """Losses and matching run in float32 whatever precision the model ran in."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: _float_outputs(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_float_outputs(v) for v in outputs]
    return outputs


def _to_device(samples, targets, device):
    samples = samples.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return samples, targets


def compute_losses(model, criterion, samples, targets, device, amp: Optional[str]):
    """-> (weighted total loss, raw loss dict)."""
    with autocast_context(device, amp):
        outputs = model(samples)
    loss_dict = criterion(_float_outputs(outputs), targets)
    weights = criterion.weight_dict
    total = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
    return total, loss_dict, outputs


def _logged(loss_dict: Dict[str, torch.Tensor], weights: Dict[str, float]):
    """All-reduced losses for logging: weighted ones under their name, raw ones as `*_unscaled`."""
    reduced = utils.reduce_dict(loss_dict)
    scaled = {k: v * weights[k] for k, v in reduced.items() if k in weights}
    unscaled = {f"{k}_unscaled": v for k, v in reduced.items()}
    return reduced, scaled, unscaled


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    max_norm: float = 0, print_freq: int = 100, amp: Optional[str] = None,
                    scaler: Optional[torch.amp.GradScaler] = None, should_stop=None,
                    progress_bar: bool = False, tb_writer=None, global_step: int = 0):
    """Trains for one pass over `data_loader`.

    should_stop: optional callable checked after every optimizer step (slurm preemption); when it
    returns True the epoch ends early and the returned stats carry `interrupted_after` = the
    number of steps done. Returns the epoch's averaged meters.
    """
    model.train()
    criterion.train()
    logger = utils.MetricLogger(delimiter="  ", progress_bar=progress_bar)
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("class_error", utils.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    steps = 0
    for samples, targets in logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]"):
        samples, targets = _to_device(samples, targets, device)
        losses, loss_dict, _ = compute_losses(model, criterion, samples, targets, device, amp)
        reduced, scaled, unscaled = _logged(loss_dict, criterion.weight_dict)
        loss_value = sum(scaled.values()).item()
        if not math.isfinite(loss_value):
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in reduced.items())
            raise NonFiniteLossError(f"loss is {loss_value} at epoch {epoch}, step {steps}; training stopped "
                                     f"and no checkpoint was written. Loss terms: {terms}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        else:
            losses.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        steps += 1
        logger.update(loss=loss_value, **scaled, **unscaled)
        logger.update(class_error=reduced["class_error"])
        logger.update(lr=optimizer.param_groups[0]["lr"])
        if tb_writer is not None:
            tb_writer.add_scalar("train/loss", loss_value, global_step + steps)
        if should_stop is not None and should_stop():
            print(f"Stopping epoch {epoch} after {steps} steps on request.", flush=True)
            break
    logger.synchronize_between_processes()
    print("Averaged stats:", logger, flush=True)
    stats = {k: meter.global_avg for k, meter in logger.meters.items()}
    if should_stop is not None and steps < len(data_loader):
        stats["interrupted_after"] = steps
    return stats


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, output_dir="",
             print_freq: int = 100, amp: Optional[str] = None, progress_bar: bool = False):
    """Eval losses plus COCO box AP. Returns (stats, coco_evaluator)."""
    model.eval()
    criterion.eval()
    logger = utils.MetricLogger(delimiter="  ", progress_bar=progress_bar)
    logger.add_meter("class_error", utils.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    coco_evaluator = CocoEvaluator(base_ds, ("bbox",))
    for samples, targets in logger.log_every(data_loader, print_freq, "Test:"):
        samples, targets = _to_device(samples, targets, device)
        _, loss_dict, outputs = compute_losses(model, criterion, samples, targets, device, amp)
        reduced, scaled, unscaled = _logged(loss_dict, criterion.weight_dict)
        logger.update(loss=sum(scaled.values()), **scaled, **unscaled)
        logger.update(class_error=reduced["class_error"])
        orig_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        results = postprocessors["bbox"](_float_outputs(outputs), orig_sizes)
        coco_evaluator.update({t["image_id"].item(): r for t, r in zip(targets, results)})
    logger.synchronize_between_processes()
    print("Averaged stats:", logger, flush=True)
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.accumulate()
    coco_evaluator.summarize()
    stats = {k: meter.global_avg for k, meter in logger.meters.items()}
    stats["coco_eval_bbox"] = coco_evaluator.coco_eval["bbox"].stats.tolist()
    return stats, coco_evaluator
