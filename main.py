"""Train and evaluate SAM-DETR. Flags and defaults are the official ones, plus a few additions
(marked "added") for custom data, CPU runs, safety and speed."""
import argparse
import datetime
import functools
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

import util.misc as utils
from datasets import build_dataset, category_names, get_coco_api_from_dataset
from datasets.coco import dataset_paths
from datasets.coco_eval import per_class_ap
from datasets.sampling import MicroBatchSampler, TrainingSampler
from engine import COCO_MAX_DETECTIONS, amp_note, detect, evaluate, optimizer_steps, train_one_epoch
from models import apply_meta_arch_defaults, build_model
from models.backbone import BackboneWeightsError
from models.decoder import RESAMPLE_MODES, SEARCH_REGIONS
from models.meta_arch import DEFAULT_META_ARCH, META_ARCHS, meta_arch
from models.roi import ROI_FORMS
from models.transformer import build_aligner_options
from models.sam_detr import INPUT_PROJ_NORM_CHOICES, default_num_classes
from util import attempts, finetune, run_start
from util.checkpoint import checkpoint_args_to_dict, save_checkpoint, save_training_checkpoint
from util.resume import (ResumePoint, adopt_finetune_flags, adopt_model_flags, describe_batch_plan_change, given,
                         optimizer_group_names, parse_args, resume, stored_flags, taken_line)
from util.rng import get_rng_state, set_rng_state
from util.slurm import ignore_preemption_signals, install_preemption_handler, preemption_signals, requeue_job
from util.step_control import HangWatchdog, StepControl


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # one kernel for the whole update instead of ~10 passes


def get_args_parser():
    parser = argparse.ArgumentParser("SAM-DETR: Accelerating DETR Convergence via Semantic-Aligned Matching",
                                     add_help=False)
    parser.add_argument("--lr", default=1e-4, type=float)
    parser.add_argument("--lr_backbone", default=1e-5, type=float)
    parser.add_argument("--lr_linear_proj_names", default=[], type=str, nargs="+")
    parser.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    parser.add_argument("--batch_size", default=2, type=int)
    parser.add_argument("--accum_steps", default=1, type=int, metavar="K",
                        help="(added) gradient accumulation: K micro-batches of --batch_size per optimizer step, "
                             "so that W processes train as W x K processes would (the same global batches, loss "
                             "normalisation and steps; e.g. the paper's 4 GPUs x 4 images on one GPU: --batch_size 4 "
                             "--accum_steps 4). Steps, checkpoints and the log count optimizer steps")
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=50, type=int)
    parser.add_argument("--lr_drop", default=40, type=int)
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")

    # model
    parser.add_argument("--meta_arch", default=DEFAULT_META_ARCH, choices=META_ARCHS,
                        help="(added) sam_detr: SAM-DETR; detr: the original DETR (Carion et al., 2020), its "
                             "baseline, with DETR's defaults where they differ")
    parser.add_argument("--frozen_weights", type=str, default=None,
                        help="(official flag, segmentation only; not supported here)")
    parser.add_argument("--multiscale", default=False, action="store_true")
    parser.add_argument("--input_proj_norm", default="auto", choices=INPUT_PROJ_NORM_CHOICES,
                        help="(added) GroupNorm after the single-scale input projection: auto follows the official "
                             "rule (only when --epochs < 25); --finetune sets it from the checkpoint's weights")
    parser.add_argument("--backbone", default="resnet50", type=str,
                        help="resnet18, resnet34, resnet50 or resnet101")
    parser.add_argument("--dilation", action="store_true",
                        help="replace the stride of the last stage with dilation (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine",))
    parser.add_argument("--no_pretrained_backbone", dest="pretrained_backbone", action="store_false",
                        help="(added) do not load ImageNet weights (also: env SAMDETR_NO_PRETRAINED=1); "
                             "they are never loaded when --resume replaces them anyway")
    parser.add_argument("--backbone_weights", default=None, metavar="FILE",
                        help="(added) the ImageNet weights of --backbone from a local file instead of torchvision's "
                             "download (for nodes without internet): a torchvision ResNet state dict (fc.* ignored), "
                             "also nested under 'state_dict' or 'model' and with its keys prefixed (e.g. 'module.', "
                             "'backbone.', 'module.encoder.' of self-supervised checkpoints): the prefix is what "
                             "precedes the stem's 'conv1.weight', and is stripped")
    parser.add_argument("--backbone_norm", default="frozen", choices=("frozen", "batch"),
                        help="(added) frozen: the official frozen BatchNorm; batch: trainable BatchNorm "
                             "and every backbone stage trained, for training from random weights")
    parser.add_argument("--enc_layers", default=6, type=int)
    parser.add_argument("--dec_layers", default=6, type=int)
    parser.add_argument("--dim_feedforward", default=2048, type=int)
    parser.add_argument("--hidden_dim", default=256, type=int)
    parser.add_argument("--dropout", default=0.1, type=float)
    parser.add_argument("--nheads", default=8, type=int)
    parser.add_argument("--num_queries", default=None, type=int, help="default: 300 (sam_detr), 100 (detr)")
    parser.add_argument("--smca", default=False, action="store_true")
    parser.add_argument("--roi_align", default="auto", choices=ROI_FORMS,
                        help="(added) how the Semantics Aligner reads its RoIs: kernel: torchvision's RoIAlign "
                             "and grid_sample; separable: the same numbers (up to float rounding) from matmuls "
                             "on the map, without the RoI tensor, faster on the CPU for small maps; auto: "
                             "separable on the CPU for maps up to a few thousand pixels, else kernel")
    # the paper's ablations of the Semantics Aligner (off by default: the official model)
    parser.add_argument("--no_sam", action="store_true",
                        help="(added) no Semantics Aligner: each decoder layer attends with its content query and "
                             "the sine embedding of its reference-box centre (the paper's baseline)")
    parser.add_argument("--sam_resample", default="salient", choices=RESAMPLE_MODES,
                        help="(added) the new query: samples at salient points (default), or the mean / max of the "
                             "7x7 RoI features")
    parser.add_argument("--sam_points", default=None, type=int, metavar="M",
                        help="(added) salient points per query, dividing --nheads (default: one per head)")
    parser.add_argument("--no_sam_reweight", action="store_true",
                        help="(added) no sigmoid reweighting of the query's content and position (attn1, attn2)")
    parser.add_argument("--sam_search", default="box", choices=SEARCH_REGIONS,
                        help="(added) where salient points lie: inside the reference box (default) or anywhere in "
                             "the image")
    parser.add_argument("--masks", action="store_true", help="(official flag; segmentation is not supported here)")
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false")

    # matcher and loss
    parser.add_argument("--set_cost_class", default=None, type=float, help="default: 2 (sam_detr), 1 (detr)")
    parser.add_argument("--set_cost_bbox", default=5.0, type=float)
    parser.add_argument("--set_cost_giou", default=2.0, type=float)
    parser.add_argument("--mask_loss_coef", default=1.0, type=float)
    parser.add_argument("--dice_loss_coef", default=1.0, type=float)
    parser.add_argument("--cls_loss_coef", default=None, type=float, help="default: 2 (sam_detr), 1 (detr)")
    parser.add_argument("--bbox_loss_coef", default=5.0, type=float)
    parser.add_argument("--giou_loss_coef", default=2.0, type=float)
    parser.add_argument("--focal_alpha", default=None, type=float, help="default: 0.25 (sam_detr only)")
    parser.add_argument("--eos_coef", default=None, type=float,
                        help="(detr only) relative weight of the no-object class; default 0.1")

    # data
    parser.add_argument("--dataset_file", default="coco")
    parser.add_argument("--coco_path", type=str, default="data/coco")
    parser.add_argument("--coco_panoptic_path", type=str)
    parser.add_argument("--remove_difficult", action="store_true")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="(added) max category id + 1; default 91 for coco, 20 otherwise")
    parser.add_argument("--train_img_dir", default="", help="(added) custom COCO-format data: training images")
    parser.add_argument("--train_ann", default="", help="(added) custom COCO-format data: training annotations")
    parser.add_argument("--val_img_dir", default="", help="(added) custom COCO-format data: validation images")
    parser.add_argument("--val_ann", default="", help="(added) custom COCO-format data: validation annotations")
    parser.add_argument("--scales", type=int, nargs="+", default=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
                        help="(added) training shorter-side sizes")
    parser.add_argument("--max_size", type=int, default=1333, help="(added) longest side after resizing")
    parser.add_argument("--val_size", type=int, default=800, help="(added) validation shorter side")
    parser.add_argument("--apply_exif", action="store_true",
                        help="(added) turn images upright as their EXIF orientation tag says, for datasets "
                             "annotated on upright photos (default: the stored bitmap, as the official loader)")

    # run
    parser.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    parser.add_argument("--device", default=None, help="cuda or cpu; default: cuda when available")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="checkpoint path or https URL")
    parser.add_argument("--finetune", default="", metavar="CKPT",
                        help="(added) start a new training run from a trained detector (path or https URL): every "
                             "tensor but the class heads is loaded, the class heads start as a new model's (rows "
                             "of classes whose names the checkpoint and the data share are kept), the optimizer, "
                             "schedule and epoch start afresh, and the model flags come from the checkpoint. "
                             "--auto_resume continues the fine-tuning run's own checkpoints")
    parser.add_argument("--finetune_fresh_heads", action="store_true",
                        help="(added) with --finetune, keep no class rows, even of classes whose names match")
    parser.add_argument("--auto_resume", action="store_true",
                        help="(added) resume from the run's newest readable checkpoint in --output_dir when there is "
                             "one (restarted and requeued jobs); in training it wins over --resume (unless --resume "
                             "names an older checkpoint of the run: the run rewinds to it, once), under --eval an "
                             "explicit --resume wins")
    parser.add_argument("--max_repeated_failures", default=run_start.DEFAULT_MAX_REPEATED_FAILURES, type=int,
                        metavar="N",
                        help="(added) stop instead of starting again from a point where N attempts in a row failed "
                             "before their next checkpoint (0: never stop); see attempts.jsonl in --output_dir")
    parser.add_argument("--check_only", action="store_true",
                        help="(added) check the flags and data paths and exit (the launchers run this first, so "
                             "that a mistake is not restarted)")
    parser.add_argument("--override_resumed_schedule", "--override_resumed_lr_drop", action="store_true",
                        help="(added) at resume, use this command's --lr, --lr_backbone, --lr_linear_proj_mult, "
                             "--weight_decay and --lr_drop instead of the checkpoint's optimizer and scheduler "
                             "settings")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--test", action="store_true",
                        help="(added) detect on COCO test-dev (--coco_path's test2017/ and "
                             "annotations/image_info_test-dev2017.json) and write the evaluation server's results "
                             "file into --output_dir; implies --eval")
    parser.add_argument("--test_name", default="",
                        help="(added) the method name in that file's name, detections_test-dev2017_<name>_results.json "
                             "(default: samdetr or detr)")
    parser.add_argument("--eval_every_epoch", default=1, type=int)
    parser.add_argument("--save_every_epoch", default=1, type=int)
    parser.add_argument("--checkpoint_steps", default=0, type=int, metavar="N",
                        help="(added) also write checkpoint.pth every N steps within an epoch (atomically; 0: only "
                             "at epoch ends), so that a hard failure costs at most N steps under --auto_resume")
    parser.add_argument("--checkpoint_minutes", default=0, type=float, metavar="M",
                        help="(added) also write checkpoint.pth within an epoch when M minutes have passed since the "
                             "last checkpoint (0: off); with --checkpoint_steps, whichever comes first")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--print_freq", default=100, type=int, help="(added) log every N iterations")
    parser.add_argument("--amp", default=None, choices=("bf16", "fp16"),
                        help="(added) mixed precision: bf16 or fp16 autocast on CUDA, bf16 on CPUs with bfloat16 "
                             "units (AVX512-BF16 or AMX on x86, BF16 on ARM); elsewhere float32, and a line says so")
    parser.add_argument("--compile", action="store_true", help="(added) torch.compile the model")
    parser.add_argument("--size_divisibility", default=1, type=int, metavar="N",
                        help="(added) pad each batch's height and width up to a multiple of N (1: the official, "
                             "the batch's largest image). With --compile, N=128 bounds the image sizes to compile")
    parser.add_argument("--tensorboard", action="store_true", help="(added) also log to output_dir/tensorboard")
    parser.add_argument("--progress_bar", action="store_true", help="(added) tqdm bar on interactive terminals")

    # distributed
    parser.add_argument("--world_size", default=1, type=int)
    parser.add_argument("--dist_url", default="env://")
    parser.add_argument("--dist_timeout", default=utils.DEFAULT_DIST_TIMEOUT_MINUTES, type=float, metavar="MINUTES",
                        help="(added) a collective that waits longer than this for a peer (hung or dead) fails with "
                             "a message naming the rank and step, so that torchrun --max-restarts or slurm can "
                             "restart the job")
    return parser


def check_run_flags(args) -> None:
    """The checks that need neither a checkpoint nor the data."""
    unsupported = [flag for flag, on in (("--masks", args.masks), ("--frozen_weights", args.frozen_weights),
                                         ("--dataset_file coco_panoptic", args.dataset_file == "coco_panoptic"))
                   if on]
    if unsupported:
        raise SystemExit(f"not supported by this codebase (detection only): {', '.join(unsupported)}")
    if args.test:
        if not args.output_dir:
            raise SystemExit("--test writes its results file into --output_dir: give one")
        args.eval = True
    check_finetune_flags(args)
    if args.eval and not (args.resume or args.auto_resume):
        raise SystemExit(f"--{'test' if args.test else 'eval'} runs trained weights: give --resume CHECKPOINT (or "
                         f"--auto_resume with the run's --output_dir)")
    if args.size_divisibility < 1:
        raise SystemExit(f"--size_divisibility must be >= 1, got {args.size_divisibility}")
    if args.accum_steps < 1:
        raise SystemExit(f"--accum_steps must be >= 1 (micro-batches per optimizer step; 1: no gradient "
                         f"accumulation), got {args.accum_steps}")
    check_finetune_flags(args)
    check_backbone_weights_flags(args)


def check_backbone_weights_flags(args) -> None:
    """--backbone_weights: not with --no_pretrained_backbone, and a file that exists (its contents
    are checked when the backbone is built: models.backbone.load_resnet_state)."""
    if not args.backbone_weights:
        return
    if not args.pretrained_backbone:
        raise SystemExit(f"--backbone_weights {args.backbone_weights} loads ImageNet weights and "
                         f"--no_pretrained_backbone starts from random ones: give one of them")
    if "://" not in args.backbone_weights and not Path(args.backbone_weights).is_file():
        raise SystemExit(f"--backbone_weights: no such file: {args.backbone_weights}")


def check_finetune_flags(args) -> None:
    if not args.finetune:
        return
    if args.eval:
        raise SystemExit(f"--finetune starts a training run; to evaluate {args.finetune}, give it as --resume")
    output_dir = Path(args.output_dir) if args.output_dir else None
    if args.resume and not run_start.is_own(args.resume, output_dir):
        raise SystemExit(f"--finetune {args.finetune} and --resume {args.resume} both start a run from a checkpoint: "
                         f"give one (--resume continues a run with its optimizer and schedule, --finetune starts a "
                         f"new one from a detector's weights)")
    if "://" not in args.finetune and not Path(args.finetune).is_file():
        raise SystemExit(f"--finetune: no such file: {args.finetune}")


def check_model_flags(args, taken: Optional[Dict] = None) -> None:
    """The architecture's defaults and the checks of the model flags, after those `taken` from a
    checkpoint (named in the message when the flags given and taken do not go together)."""
    try:
        try:
            apply_meta_arch_defaults(args)
        except ValueError as error:
            raise SystemExit(str(error)) from None
        check_aligner(args)
    except SystemExit as stop:
        if not taken:
            raise
        flags = " ".join(f"--{k}={v}" for k, v in taken.items())
        raise SystemExit(f"{stop.code} (these were taken from the checkpoint, not given: {flags}; the flags given "
                         f"ask for another model than the checkpoint holds)") from None
    note = amp_note(torch.device(args.device), args.amp) if args.device else None
    if note:
        print(note)


def check_args(args) -> None:
    check_run_flags(args)
    check_model_flags(args)


def check_aligner(args) -> None:
    """Refuses an impossible combination of the Semantics Aligner's switches, naming the flags."""
    if meta_arch(args) == "sam_detr":
        problems = build_aligner_options(args).problems(args.nheads, args.smca)
        if problems:
            raise SystemExit("impossible combination of flags: " + "; ".join(problems))


def param_groups(model, args):
    """The official groups: backbone at lr_backbone, --lr_linear_proj_names at lr * mult, the rest at lr."""
    def is_proj(name):
        return any(k in name for k in args.lr_linear_proj_names)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if "backbone.0" not in n and not is_proj(n)], "lr": args.lr},
        {"params": [p for n, p in named if "backbone.0" in n], "lr": args.lr_backbone},
        {"params": [p for n, p in named if is_proj(n)], "lr": args.lr * args.lr_linear_proj_mult},
    ]


def group_names(model, optimizer) -> List[List[str]]:
    """The parameter names of each optimizer group, stored in checkpoints to check a resume."""
    return optimizer_group_names(optimizer.param_groups, {id(p): n for n, p in model.named_parameters()})


def loader_settings(args) -> dict:
    """DataLoader keywords shared by every loader of a run.

    Workers persist across epochs (no re-fork and re-import per epoch) and batches are pinned on
    CUDA so that the host-to-device copy is asynchronous. Two workers per GPU keep up with the
    GPU step at its target speed (docs/data.md, "Data loading").
    """
    collate = functools.partial(utils.collate_fn, size_divisibility=getattr(args, "size_divisibility", 1))
    # the workers' base seed comes from this generator, not the global one: starting a loader draws
    # nothing from the stream dropout draws from, so a resumed run draws what an uninterrupted one does
    seeds = torch.Generator().manual_seed(getattr(args, "seed", 0))
    settings = dict(collate_fn=collate, num_workers=args.num_workers, generator=seeds,
                    pin_memory=str(args.device).startswith("cuda"), worker_init_fn=ignore_preemption_signals)
    if args.num_workers > 0:
        settings["persistent_workers"] = True
    return settings


def build_loaders(args, dataset_train, dataset_val):
    """-> (train sampler, train loader, val loader); the train pair is None without a train set."""
    sampler_val = (DistributedSampler(dataset_val, shuffle=False) if args.distributed
                   else torch.utils.data.SequentialSampler(dataset_val))
    common = loader_settings(args)
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False, **common)
    if dataset_train is None:
        return None, None, loader_val
    sampler_train = TrainingSampler(dataset_train, num_replicas=utils.get_world_size(), rank=utils.get_rank(),
                                    seed=args.seed, accum_steps=args.accum_steps)
    batch_sampler = MicroBatchSampler(sampler_train, args.batch_size, args.accum_steps)
    if len(batch_sampler) == 0:
        processes = f" on each of {args.world_size} processes" if args.distributed else ""
        micro = f" x --accum_steps {args.accum_steps}" if args.accum_steps > 1 else ""
        raise SystemExit(f"the training set has {len(dataset_train)} images: {len(sampler_train)}{processes} is "
                         f"less than one batch of --batch_size {args.batch_size}{micro} (incomplete batches are "
                         f"dropped). Lower --batch_size{' or --accum_steps' if micro else ''} or add images.")
    loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, **common)
    return sampler_train, loader_train, loader_val


def build_datasets(args):
    """(train set or None under --eval, val set); a missing or malformed file stops naming it."""
    try:
        dataset_train = None if args.eval else build_dataset(image_set="train", args=args)
        # under --test, "val" is test-dev: images without annotations
        dataset_val = build_dataset(image_set="test" if args.test else "val", args=args)
    except (FileNotFoundError, ValueError) as error:  # the data or its flags: another try would fail alike
        raise SystemExit(str(error)) from error
    return dataset_train, dataset_val


@dataclass
class Run:
    """What the training loop works with."""
    model: torch.nn.Module              # what is called: DDP-wrapped and/or compiled
    model_without_ddp: torch.nn.Module  # what is saved
    criterion: torch.nn.Module
    postprocessors: dict
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Optional[torch.amp.GradScaler]
    device: torch.device
    output_dir: Optional[Path]
    n_parameters: int
    class_names: Dict[int, str] = field(default_factory=dict)  # saved in checkpoints, read by demo.py
    global_step: int = 0  # optimizer steps taken since the run began: TensorBoard's x axis


# with --size_divisibility the padded sizes are few: keep a graph for each (train and eval) rather
# than running eagerly after torch's default of 8
COMPILED_SIZES_LIMIT = 128


def compile_model(model: torch.nn.Module, size_divisibility: int) -> torch.nn.Module:
    """torch.compile with static shapes: each new padded image size is compiled once.

    Dynamic shapes do not pay in torch 2.14.1: the backward graph keeps the first size's strides
    of the saved activations (pytorch/pytorch#194420), so training compiles every new size anyway,
    and inductor fails on some dynamic-shape views of the multi-scale encoder.
    """
    if size_divisibility > 1:
        torch.compiler.config.recompile_limit = max(torch.compiler.config.recompile_limit, COMPILED_SIZES_LIMIT)
    return torch.compile(model, dynamic=False)


def nothing_to_evaluate(args, start: run_start.Start) -> str:
    where = (f"--auto_resume looked for checkpoint.pth and checkpointNNNN.pth in {start.looked_in} and found "
             f"none that can be read" if start.looked_in else "no checkpoint was given")
    return (f"--{'test' if args.test else 'eval'} runs trained weights, but {where}: give --resume CHECKPOINT "
            f"(an untrained model is never evaluated)")


def main(args):
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    utils.init_distributed_mode(args)
    check_run_flags(args)
    given_now = given(args, get_args_parser())
    if args.output_dir and utils.is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # one decision for every rank: which checkpoint the run starts from (util/run_start.py)
    start, ckpt = run_start.decide(args)
    if args.eval and ckpt is None:
        raise SystemExit(nothing_to_evaluate(args, start))
    if start.finetune:
        taken = adopt_finetune_flags(args, stored_flags(ckpt), ckpt["model"], given_now)
    else:
        taken = adopt_model_flags(args, stored_flags(ckpt), given_now) if ckpt is not None else {}
    if taken:
        print(taken_line(taken))
    check_model_flags(args, taken)
    args.num_classes = default_num_classes(args)  # the data checks need the effective value
    print(args)
    device = torch.device(args.device)
    if device.type == "cpu":
        # denormal floats (tiny gradients, Adam's second moments) run ~100x slower on x86 CPUs
        torch.set_flush_denormal(True)

    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    try:
        model, criterion, postprocessors = build_model(args)
    except BackboneWeightsError as error:  # no internet, or a file that does not fit: a retry fails alike
        raise SystemExit(str(error)) from None
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("Total number of params in model: ", n_parameters)
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type in FUSED_ADAMW_DEVICES)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" and device.type == "cuda" else None

    dataset_train, dataset_val = build_datasets(args)
    base_ds = None if args.test else get_coco_api_from_dataset(dataset_val)
    output_dir = Path(args.output_dir) if args.output_dir else None

    if start.finetune:
        for line in finetune.start_from(model, ckpt, start.path, category_names(dataset_train), args.num_classes,
                                        keep_shared=not args.finetune_fresh_heads):
            print(line)
        resumed = ResumePoint()
    else:
        resumed = resume(args, model, optimizer, lr_scheduler, scaler, ckpt, start.path,
                         group_names(model, optimizer), param_groups(model, args))
    if ckpt is not None:
        run_start.verify_same_state(model, start)  # every rank holds what rank 0 chose, or the run stops
    del ckpt  # the weights and states are copied: free the checkpoint's memory
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
    called = compile_model(model, args.size_divisibility) if args.compile else model
    run = Run(called, model_without_ddp, criterion, postprocessors,
              optimizer, lr_scheduler, scaler, device, output_dir, n_parameters,
              category_names(dataset_val if dataset_train is None else dataset_train))

    if args.test:
        _, _, loader_test = build_loaders(args, None, dataset_val)
        return write_test_results(args, run, loader_test)
    if args.eval:
        _, _, loader_val = build_loaders(args, None, dataset_val)
        test_stats, coco_evaluator = run_evaluation(args, run, loader_val, base_ds)
        if output_dir is not None and utils.is_main_process():
            save_checkpoint(eval_dump(coco_evaluator), output_dir / "eval.pth")
        print(ap_line(test_stats))
        return test_stats
    sampler_train, loader_train, loader_val = build_loaders(args, dataset_train, dataset_val)
    return train(args, run, start, resumed, sampler_train, loader_train, loader_val, base_ds)


def evaluation_due(args, epoch: int) -> bool:
    """Whether epoch `epoch` ends with an evaluation and a log line: every --eval_every_epoch epochs,
    and always after the last, so that the final weights are evaluated."""
    return (epoch + 1) % args.eval_every_epoch == 0 or epoch == args.epochs - 1


def train(args, run: Run, start: run_start.Start, resumed: ResumePoint, sampler_train, loader_train, loader_val,
          base_ds):
    """The training loop: epochs of training, each followed by its checkpoint, then its evaluation
    and log line. Every event that ends this attempt is recorded in attempts.jsonl."""
    if resumed.items:
        try:
            sampler_train.start_at(resumed.items)
        except ValueError:
            raise SystemExit(f"the checkpoint was written after {resumed.items} items of epoch {args.start_epoch}, "
                             f"but an epoch has {sampler_train.total_size} now: the training set changed since. "
                             f"Resume with the same data, or from the checkpoint of the epoch before.") from None
        note = describe_batch_plan_change(resumed.saved_args, resumed.items, args.start_epoch, args,
                                          sampler_train.total_size)
        if note:
            print(note)
    run.global_step = (resumed.global_step if resumed.global_step is not None
                       else args.start_epoch * (sampler_train.total_size // items_per_step(args)) + resumed.step)
    watchdog = None
    if utils.is_dist_avail_and_initialized() and torch.distributed.get_backend() == "nccl":
        watchdog = HangWatchdog(utils.dist_timeout(args), utils.get_rank(), utils.get_world_size())
    control = StepControl(install_preemption_handler(preemption_signals(os.environ)), args.checkpoint_steps,
                          args.checkpoint_minutes, run.device, watchdog)
    tb_writer = None
    if args.tensorboard and run.output_dir is not None and utils.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        # a resumed run drops what the interrupted one logged after its checkpoint: steps never go back
        tb_writer = SummaryWriter(str(run.output_dir / "tensorboard"),
                                  purge_step=run.global_step if resumed.resumed else None)
    test_stats = None
    epoch, steps_before = args.start_epoch, resumed.step
    try:
        missed = run_start.missed_evaluation(args, start, lambda e: evaluation_due(args, e))
        if missed is not None:
            print(f"Evaluating epoch {missed}, whose evaluation the interrupted attempt did not finish")
            test_stats, coco_evaluator = run_evaluation(args, run, loader_val, base_ds)
            log_epoch(run.output_dir, missed, resumed.train_stats, test_stats, run.n_parameters, coco_evaluator,
                      tb_writer)
        print("Start training")
        start_time = time.time()
        for epoch in range(args.start_epoch, args.epochs):
            sampler_train.set_epoch(epoch)
            train_stats, stop = train_epoch(args, run, epoch, loader_train, sampler_train, steps_before, control,
                                            tb_writer)
            steps_before = 0
            sampler_train.start_at(0)
            if stop:
                preempted(args, start, epoch)
            if evaluation_due(args, epoch):
                test_stats, coco_evaluator = run_evaluation(args, run, loader_val, base_ds)
                log_epoch(run.output_dir, epoch, train_stats, test_stats, run.n_parameters, coco_evaluator,
                          tb_writer)
    except BaseException as error:
        if not (isinstance(error, SystemExit) and error.code in (0, None)):
            run_start.record(args, start, attempts.failure_event(start.attempt, epoch, control.step, error))
        raise
    finally:
        control.flag.restore()
        if watchdog is not None:
            watchdog.close()
        if tb_writer is not None:
            tb_writer.close()
    run_start.record(args, start, {"completed": True})
    total_time = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    print(f"Training completed.\nTotal training time: {total_time}")
    if test_stats is not None:
        print(ap_line(test_stats))
    return test_stats


def preempted(args, start: run_start.Start, epoch: int) -> None:
    """After the checkpoint of a stop: requeue the slurm job and end this process."""
    if utils.is_main_process():
        requeue_job()
    run_start.record(args, start, {"preempted": True})
    print(f"Preempted: saved epoch {epoch}; exiting so that the job can be requeued.", flush=True)
    sys.exit(0)


def test_results_path(args) -> Path:
    """output_dir/detections_test-dev2017_<name>_results.json, the name the evaluation server expects."""
    name = args.test_name or meta_arch(args).replace("_", "")
    return Path(args.output_dir) / f"detections_test-dev2017_{name}_results.json"


def write_test_results(args, run: Run, loader_test) -> Path:
    """Detects on test-dev (gathered to rank 0) and writes the results file on rank 0."""
    results = detect(run.model, run.postprocessors, loader_test, run.device, args.amp, args.print_freq,
                     args.progress_bar)
    path = test_results_path(args)
    if utils.is_main_process():
        images = len({r["image_id"] for r in results})
        save_json_atomically(results, path)
        print(f"wrote {len(results)} detections of {images} images (at most {COCO_MAX_DETECTIONS} each) -> {path}")
    return path


def save_json_atomically(data, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def ap_line(test_stats: dict) -> str:
    """The headline COCO numbers on one line, printed last."""
    ap, ap50, ap75 = test_stats["coco_eval_bbox"][:3]
    return f"bbox AP: {ap:.4f}  AP50: {ap50:.4f}  AP75: {ap75:.4f}"


def items_per_step(args) -> int:
    """Training images of one optimizer step over all processes: the global batch."""
    return args.batch_size * args.accum_steps * utils.get_world_size()


def train_epoch(args, run: Run, epoch: int, loader_train, sampler_train, steps_before: int, control: StepControl,
                tb_writer) -> Tuple[dict, bool]:
    """One epoch (the rest of one, after `steps_before` steps of a resumed epoch), its mid-epoch
    checkpoints and its end checkpoint. -> (stats, whether the run must stop now)."""
    items_before = sampler_train.start
    step_items = items_per_step(args)
    epoch_steps = steps_before + optimizer_steps(loader_train, args.accum_steps)
    is_saver = run.output_dir is not None and utils.is_main_process()

    def state(steps: int, **extra) -> Optional[dict]:
        """Everything a run continues from exactly, on the saver (None elsewhere). Every rank calls it:
        it gathers every rank's random state as it is now, so that each continues its own dropout
        stream (the data draw nothing from it) and a resumed run draws what an uninterrupted one draws."""
        rngs = utils.all_gather(get_rng_state())
        if not is_saver:
            return None
        # taken after any scheduler step: the optimizer's param groups carry the current lr
        ckpt = {"model": run.model_without_ddp.state_dict(), "optimizer": run.optimizer.state_dict(),
                "optimizer_param_names": group_names(run.model_without_ddp, run.optimizer),
                "lr_scheduler": run.lr_scheduler.state_dict(), "epoch": epoch,
                "global_step": run.global_step + steps - steps_before, "rng": rngs[0], "rng_per_rank": rngs,
                "args": checkpoint_args_to_dict(args), "class_names": run.class_names, **extra}
        if run.scaler is not None:
            ckpt["scaler"] = run.scaler.state_dict()
        return ckpt

    def save_mid_epoch(steps: int) -> None:
        """checkpoint.pth after `steps` steps of the epoch, written atomically (every rank calls it)."""
        ckpt = state(steps, step=steps, epoch_items=items_before + (steps - steps_before) * step_items)
        if is_saver:
            save_checkpoint(ckpt, run.output_dir / "checkpoint.pth")

    control.begin_epoch(epoch, epoch_steps, save_mid_epoch, steps_before)
    train_stats = train_one_epoch(run.model, run.criterion, loader_train, run.optimizer, run.device, epoch,
                                  args.clip_max_norm, print_freq=args.print_freq, amp=args.amp, scaler=run.scaler,
                                  control=control, progress_bar=args.progress_bar, tb_writer=tb_writer,
                                  global_step=run.global_step, accum_steps=args.accum_steps)
    stop_at_end = control.end_epoch()  # every rank at the same point
    if "interrupted_after" in train_stats:
        return train_stats, True  # the stop's checkpoint is written
    run.global_step += optimizer_steps(loader_train, args.accum_steps)
    run.lr_scheduler.step()
    ckpt = state(steps_before, train_stats=train_stats)  # global_step: counted already
    if is_saver:
        save_training_checkpoint(run.output_dir, ckpt, epoch, args.save_every_epoch)
    control.checkpoint_written()
    return train_stats, stop_at_end


def run_evaluation(args, run: Run, loader_val, base_ds):
    """evaluate(), leaving the random state as it found it: a resumed run then draws exactly what
    an uninterrupted one draws."""
    rng = get_rng_state()
    try:
        return evaluate(run.model, run.criterion, run.postprocessors, loader_val, base_ds, run.device,
                        args.output_dir, print_freq=args.print_freq, amp=args.amp,
                        progress_bar=args.progress_bar)
    finally:
        set_rng_state(rng)


def eval_dump(coco_evaluator) -> dict:
    """COCOeval's accumulated arrays (precision, recall, scores, ...) as tensors, loadable with
    weights_only=True; pycocotools' Params object is left out. 'per_class': the AP per category
    (datasets.coco_eval.per_class_ap: {category id: {'name', 'objects', 'AP', 'AP50'}})."""
    coco_eval = coco_evaluator.coco_eval["bbox"]
    return {**{k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
               for k, v in coco_eval.eval.items() if k != "params"},
            "per_class": per_class_ap(coco_eval)}


def log_epoch(output_dir, epoch, train_stats, test_stats, n_parameters, coco_evaluator, tb_writer) -> None:
    """One JSON line per epoch in log.txt (official keys, plus test_per_class: the AP per category) and
    the eval dumps, on rank 0 only."""
    if output_dir is None or not utils.is_main_process():
        return
    log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"test_{k}": v for k, v in test_stats.items()},
                 "epoch": epoch, "n_parameters": n_parameters}
    with (output_dir / "log.txt").open("a") as f:
        f.write(json.dumps(log_stats) + "\n")
    (output_dir / "eval").mkdir(exist_ok=True)
    for name in ("latest.pth", f"{epoch:04}.pth"):
        save_checkpoint(eval_dump(coco_evaluator), output_dir / "eval" / name)
    if tb_writer is not None:
        for k, v in test_stats.items():
            if isinstance(v, float):
                tb_writer.add_scalar(f"test/{k}", v, epoch)
        tb_writer.add_scalar("test/AP", test_stats["coco_eval_bbox"][0], epoch)
        tb_writer.flush()


# main.py's exit status when it stops for a reason that another try would meet again (a flag, a
# path, the data, a failure that repeats): the launchers do not restart it
EXIT_NO_RETRY = 2
STOPPED_FILE = "stopped.txt"  # in --output_dir: why, written with EXIT_NO_RETRY


def check_only(args) -> None:
    """--check_only: the checks that need no checkpoint and no data contents (flags, paths); the
    launchers run it before starting the processes, so that a mistake is not restarted."""
    check_args(args)
    for image_set in (("test",) if args.test else ("val",) if args.eval else ("train", "val")):
        try:
            for path in dataset_paths(image_set, args):
                if not path.exists():
                    raise SystemExit(f"{image_set} data: missing {path}")
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if args.resume and "://" not in args.resume and not Path(args.resume).exists():
        raise SystemExit(f"--resume {args.resume}: no such file")
    print("check_only: the flags and paths are fine")


def cli(argv=None) -> int:
    """The command line: main() with the given flags recorded; a stop with a message exits with
    EXIT_NO_RETRY."""
    args = parse_args(argparse.ArgumentParser("SAM-DETR", parents=[get_args_parser()]), argv)
    try:
        if args.check_only:
            check_only(args)
            return 0
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        main(args)
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise
        print(stop.code, file=sys.stderr, flush=True)
        if args.output_dir and utils.is_main_process() and Path(args.output_dir).is_dir():
            # for the launchers (scripts_slurm/launch.sh), which do not start such a run again
            (Path(args.output_dir) / STOPPED_FILE).write_text(stop.code + "\n")
        return EXIT_NO_RETRY
    finally:
        if utils.is_dist_avail_and_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
