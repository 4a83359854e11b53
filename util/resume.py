"""The resume policy: what a checkpoint decides about a run's flags, in one table.

main.py (training, --eval, --test), demo.py and tools/export_onnx.py read a checkpoint's flags
through this module, with the same meaning of "given":

**Given** means written on the command line, whatever the value (an explicit `--epochs 50` is given
even though 50 is the default). A Namespace built by code, which carries no record of its command
line, counts as given every flag whose value differs from the parser's default.

Each flag a checkpoint can speak about has one or more rules (``FLAG_RULES``); run flags (paths,
device, --eval, ...) have none and are never read from a checkpoint:

========================  =========================================================================
rule                      meaning
========================  =========================================================================
``model``                 decides the weights' names and shapes, or what the model sees: taken from
                          the checkpoint unless given. A given value that differs is used and
                          reported; weights that then do not fit stop with the flag to fix
                          (models.load_weights). Everywhere: training, evaluation, demo, export.
``schedule``              lives in the optimizer and scheduler state: a training resume keeps the
                          checkpoint's value unless --override_resumed_schedule. Reported.
``optimizer_groups``      decides which parameters the optimizer trains and in which group: a
                          training resume whose groups would differ from the checkpoint's stops,
                          naming the flags (Adam's moments would attach to other parameters).
``batch_plan``            decides an epoch's batches: resuming a mid-epoch checkpoint with another
                          value regroups (batch size, process count, --accum_steps) or redraws
                          (seed) the rest of that epoch, and says so. Reported.
``reported``              other training flags: this command's value is used, and reported at a
                          training resume when it differs.
========================  =========================================================================

A fine-tuning start (--finetune, util/finetune.py) takes the ``model`` flags from its checkpoint
as an evaluation does, except FINETUNE_OWN_FLAGS (the new run's schedule and classes); the input
projection's GroupNorm follows the weights. No other rule applies: the optimizer, schedule, epoch
and batch plan start afresh.
"""
from __future__ import annotations

import argparse
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np
import torch

import models
import util.misc as utils
from models.transformer import ALIGNER_FLAGS
from models.weights import state_meta_arch
from util.checkpoint import args_from_checkpoint
from util.rng import set_rng_state

MODEL, SCHEDULE, OPTIMIZER_GROUPS, BATCH_PLAN, REPORTED = "model", "schedule", "optimizer_groups", "batch_plan", "reported"

# the flags that decide the architecture (state-dict names and shapes) or the model's input
MODEL_FLAGS = (
    "meta_arch",  # SAM-DETR or DETR: the model, its post-processor and the defaults of unset flags
    "backbone", "backbone_norm", "dilation", "multiscale", "position_embedding", "hidden_dim", "nheads",
    "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "smca",
    *ALIGNER_FLAGS,  # the paper's ablations of the Semantics Aligner
    "epochs",  # single-scale runs shorter than 25 epochs have a GroupNorm in input_proj (official rule)
    "num_classes", "dataset_file",  # dataset_file decides the default num_classes
    "val_size", "max_size",
    "apply_exif",  # the model was trained on images read this way
    "input_proj_norm",  # set by --finetune from the weights, so that its own --epochs do not decide it
)
# A fine-tuning run (--finetune) takes the model flags from its checkpoint as --eval does, except
# these, which belong to the new run: its schedule and its classes.
FINETUNE_OWN_FLAGS = ("epochs", "num_classes", "dataset_file")
INPUT_PROJ_NORM_KEY = "input_proj.0.1.weight"  # a single-scale SAM-DETR's GroupNorm after the input projection

FLAG_RULES: Dict[str, Tuple[str, ...]] = {
    **{flag: (MODEL,) for flag in MODEL_FLAGS},
    "epochs": (MODEL, REPORTED),
    "lr": (SCHEDULE,), "lr_linear_proj_mult": (SCHEDULE,), "weight_decay": (SCHEDULE,), "lr_drop": (SCHEDULE,),
    "lr_backbone": (SCHEDULE, OPTIMIZER_GROUPS),  # 0 freezes the backbone: its parameters leave the optimizer
    "lr_linear_proj_names": (OPTIMIZER_GROUPS,),
    "batch_size": (BATCH_PLAN,), "world_size": (BATCH_PLAN,), "seed": (BATCH_PLAN,), "accum_steps": (BATCH_PLAN,),
    **{flag: (REPORTED,) for flag in (
        "clip_max_norm", "amp", "cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "set_cost_class",
        "set_cost_bbox", "set_cost_giou", "focal_alpha", "eos_coef", "dropout", "aux_loss", "scales",
        "size_divisibility")},
}


def flags_with(rule: str) -> Tuple[str, ...]:
    return tuple(flag for flag, rules in FLAG_RULES.items() if rule in rules)


# --------------------------------------------------------------------------------------------
# What "given" means
# --------------------------------------------------------------------------------------------
GIVEN_ATTRIBUTE = "given_flags"  # where parse_args records the command line's flags on the Namespace


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str], parsed: argparse.Namespace) -> Set[str]:
    """The destinations set on the command line `argv`, whatever their value.

    argv is parsed a second time into a namespace pre-filled with a sentinel: argparse fills
    defaults only into attributes that are absent, so whatever no longer holds the sentinel was
    given (comparing with the defaults would miss an explicit `--epochs 50`).
    """
    unset = object()
    probe = argparse.Namespace(**{dest: unset for dest in vars(parsed)})
    parser.parse_args(list(argv), namespace=probe)
    return {dest for dest, value in vars(probe).items() if value is not unset}


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """parser.parse_args(argv), with the given flags recorded on the result (see `given`)."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    setattr(args, GIVEN_ATTRIBUTE, sorted(given_flags(parser, argv, args)))
    return args


def given(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Set[str]:
    """The flags given for `args`: its recorded command line, else those that differ from the defaults."""
    recorded = getattr(args, GIVEN_ATTRIBUTE, None)
    if recorded is not None:
        return set(recorded)
    return {dest for dest, value in vars(args).items() if value != parser.get_default(dest)}


# --------------------------------------------------------------------------------------------
# The model flags
# --------------------------------------------------------------------------------------------
def stored_flags(ckpt: Mapping[str, Any], state: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """The flags a checkpoint stores; `meta_arch`, when it stores none (official DETR and SAM-DETR
    checkpoints predate the flag), is read off its weights."""
    flags = args_from_checkpoint(ckpt)
    state = ckpt.get("model") if state is None else state
    if "meta_arch" not in flags and state is not None and state_meta_arch(state):
        flags["meta_arch"] = state_meta_arch(state)
    return flags


def adopt_model_flags(args: argparse.Namespace, stored: Mapping[str, Any], given_set: Set[str]) -> Dict[str, Any]:
    """Sets each `model` flag the checkpoint stores and the command line did not give; returns the
    flags taken (name -> value), for the log."""
    taken = {}
    for flag in flags_with(MODEL):
        if flag in stored and flag not in given_set and getattr(args, flag, None) != stored[flag]:
            setattr(args, flag, stored[flag])
            taken[flag] = stored[flag]
    return taken


def adopt_finetune_flags(args: argparse.Namespace, stored: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                         given_set: Set[str]) -> Dict[str, Any]:
    """adopt_model_flags for a fine-tuning start: the run's own FINETUNE_OWN_FLAGS stay, and the
    input projection's GroupNorm follows the weights (the official rule would read it off the new
    run's --epochs: a 50-epoch checkpoint fine-tuned for 12 epochs would not load)."""
    taken = adopt_model_flags(args, {k: v for k, v in stored.items() if k not in FINETUNE_OWN_FLAGS}, given_set)
    if "input_proj_norm" not in given_set:
        norm = "on" if INPUT_PROJ_NORM_KEY in state else "off"
        if args.input_proj_norm != norm:
            args.input_proj_norm = taken["input_proj_norm"] = norm
    return taken


def taken_line(taken: Mapping[str, Any], source: str = "the checkpoint") -> str:
    return f"model flags from {source}: " + " ".join(f"--{k}={v}" for k, v in taken.items())


# --------------------------------------------------------------------------------------------
# A training resume
# --------------------------------------------------------------------------------------------
def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def changed_flags(saved: Mapping[str, Any], args: argparse.Namespace) -> List[str]:
    """The training flags (every rule) whose value differs from the checkpoint's."""
    return [flag for flag in FLAG_RULES
            if flag in saved and hasattr(args, flag) and _plain(saved[flag]) != _plain(getattr(args, flag))]


def report_changed_flags(saved: Mapping[str, Any], args: argparse.Namespace) -> None:
    """Prints each flag whose value differs from the checkpoint's, and which value is used."""
    for flag in changed_flags(saved, args):
        old, new = saved[flag], getattr(args, flag)
        if SCHEDULE in FLAG_RULES[flag] and not args.override_resumed_schedule:
            used = f"the checkpoint's {old} is kept (--override_resumed_schedule uses {new})"
        else:
            used = f"{new} is used"
        print(f"Resume: --{flag} was {old} in the checkpoint and is {new} now: {used}")


def optimizer_group_names(groups: Sequence[Mapping[str, Any]], names: Mapping[int, str]) -> List[List[str]]:
    """The parameter names of each optimizer group (`names`: id(parameter) -> name)."""
    return [[names[id(p)] for p in group["params"]] for group in groups]


def check_optimizer_groups(ckpt: Mapping[str, Any], current: Sequence[Sequence[str]], args: argparse.Namespace,
                           source: str) -> None:
    """Stops when the checkpoint's optimizer state was built over other groups of parameters than
    this command's: loading it would attach Adam's moments to other parameters (or fail)."""
    saved_names = ckpt.get("optimizer_param_names")
    saved_sizes = [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]]
    same = ([list(g) for g in saved_names] == [list(g) for g in current] if saved_names is not None
            else saved_sizes == [len(g) for g in current])
    if same:
        return
    saved = args_from_checkpoint(ckpt)
    flags = ", ".join(f"--{flag} {saved[flag]!r} (now {getattr(args, flag)!r})" for flag in flags_with(OPTIMIZER_GROUPS)
                      if flag in saved and _plain(saved[flag]) != _plain(getattr(args, flag)))
    raise SystemExit(
        f"{source}: its optimizer state holds {saved_sizes} parameters in its groups, this command's optimizer "
        f"{[len(g) for g in current]}: which parameters are trained, and in which group, changed"
        + (f" ({flags})" if flags else "") + ". Loading it would attach Adam's moments to other parameters. "
        "Resume with the checkpoint's --lr_backbone (zero or not) and --lr_linear_proj_names.")


class BatchPlan(NamedTuple):
    """What decides an epoch's batches (a checkpoint or flags without --accum_steps have 1)."""
    batch_size: int  # per process and micro-batch
    processes: int
    seed: int
    accum_steps: int  # micro-batches per optimizer step

    def words(self) -> str:
        micro = f" x {self.accum_steps} micro-batches" if self.accum_steps > 1 else ""
        return f"{self.processes} process(es) x {self.batch_size} images{micro} per step and --seed {self.seed}"


def batch_plan(args_or_saved) -> BatchPlan:
    """The batch plan of a run's flags or of a checkpoint's."""
    get = args_or_saved.get if isinstance(args_or_saved, Mapping) else lambda k, d=None: getattr(args_or_saved, k, d)
    return BatchPlan(int(get("batch_size", 0)), int(get("world_size", 1) or 1), int(get("seed", 0)),
                     int(get("accum_steps", 1) or 1))


def items_done(ckpt: Mapping[str, Any]) -> int:
    """Items of the epoch's order a mid-epoch checkpoint has trained on (0 at an epoch's end)."""
    if "epoch_items" in ckpt:
        return int(ckpt["epoch_items"])
    plan = batch_plan(args_from_checkpoint(ckpt))
    # checkpoints before the entry existed
    return int(ckpt.get("step", 0)) * plan.batch_size * plan.processes * plan.accum_steps


def describe_batch_plan_change(saved: Mapping[str, Any], done: int, epoch: int, args: argparse.Namespace,
                               total_items: int) -> Optional[str]:
    """What happens to the rest of epoch `epoch`, of which a mid-epoch checkpoint with flags `saved`
    trained on `done` items, under this command's batch plan (None when the plan is the
    checkpoint's: the batches are then exactly those it would have had)."""
    before, now = batch_plan(saved), batch_plan(args)
    if before == now:
        return None
    head = (f"Resume: the checkpoint was written after {done} of epoch {epoch}'s {total_items} items with "
            f"{before.words()}; this run has {now.words()}: ")
    if before.seed == now.seed:
        return head + ("the epoch's remaining items follow in the same order, grouped into other batches (the same "
                       "data; dropout and the batch statistics differ from an uninterrupted run)")
    return head + ("the rest of the epoch is drawn afresh from the new seed's order after its first "
                   f"{done} items: some images of this epoch are seen twice and others not at all")


# --------------------------------------------------------------------------------------------
# Loading a checkpoint into a run
# --------------------------------------------------------------------------------------------
@dataclass
class ResumePoint:
    """Where a resumed training run starts: `items` of epoch args.start_epoch's order already trained
    on (after `step` steps), the count of optimizer steps before it (`global_step`, the TensorBoard
    x axis; None when the checkpoint has none) and the stats of the epoch it ended (for an
    evaluation it missed)."""
    items: int = 0
    step: int = 0
    global_step: Optional[int] = None
    resumed: bool = False
    train_stats: dict = field(default_factory=dict)
    saved_args: dict = field(default_factory=dict)  # the checkpoint's flags


def resume(args, model, optimizer, lr_scheduler, scaler, ckpt: Optional[dict], source: str,
           group_names: List[List[str]], new_groups: List[dict]) -> ResumePoint:
    """Loads the checkpoint (util.run_start.decide chose it; `source` names it) into the model, and for
    training into the optimizer, scheduler, scaler and random state.

    group_names: the parameter names of each of the optimizer's groups; new_groups: this command's
    param groups (their "lr"), for --override_resumed_schedule."""
    if ckpt is None:
        return ResumePoint()
    models.load_weights(model, ckpt["model"], source=source)
    if args.eval or not all(k in ckpt for k in ("optimizer", "lr_scheduler", "epoch")):
        return ResumePoint()
    check_optimizer_groups(ckpt, group_names, args, source)
    report_changed_flags(args_from_checkpoint(ckpt), args)
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if args.override_resumed_schedule:
        override_schedule(optimizer, lr_scheduler, new_groups, args)
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    items = items_done(ckpt)
    # a mid-epoch checkpoint records the epoch in progress and the items trained in it
    args.start_epoch = ckpt["epoch"] + (0 if items else 1)
    restore_rng(ckpt, args.seed)
    global_step = ckpt.get("global_step")
    return ResumePoint(items, int(ckpt.get("step", 0)), None if global_step is None else int(global_step),
                       resumed=True, train_stats=dict(ckpt.get("train_stats") or {}),
                       saved_args=args_from_checkpoint(ckpt))


def override_schedule(optimizer, lr_scheduler, new_groups: List[dict], args) -> None:
    """This command's learning rates (of `new_groups`), weight decay and --lr_drop replace the resumed
    ones; the scheduler's epoch count stays, so the rate is that of the current epoch under the new
    schedule."""
    for group, new in zip(optimizer.param_groups, new_groups):
        group["initial_lr"], group["weight_decay"] = new["lr"], args.weight_decay
    lr_scheduler.step_size = args.lr_drop
    lr_scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    decay = lr_scheduler.gamma ** (lr_scheduler.last_epoch // lr_scheduler.step_size)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * decay


def restore_rng(ckpt: dict, seed: int = 0) -> None:
    """This rank's own random state from the checkpoint when it holds every rank's and the process
    count is the same. One process takes the writer's state (older checkpoints and the official code
    store only that). Another process count gives every rank a stream of its own, drawn from (seed,
    epoch, step, rank): restoring one state on all would give every rank the same dropout masks."""
    per_rank = ckpt.get("rng_per_rank")
    world_size, rank = utils.get_world_size(), utils.get_rank()
    if per_rank and len(per_rank) == world_size:
        set_rng_state(per_rank[rank])
    elif world_size == 1 and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    else:
        text = f"sam-detr/rng/{seed}/{ckpt.get('epoch', 0)}/{ckpt.get('step', 0)}/{rank}"
        derived = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        torch.manual_seed(derived)
        np.random.seed(derived % 2 ** 32)
        random.seed(derived)
        if "rng" in ckpt or per_rank:
            print(f"Resume: the checkpoint holds the random state of {len(per_rank or [1])} process(es), this run "
                  f"has {world_size}: every rank starts a dropout stream of its own")
