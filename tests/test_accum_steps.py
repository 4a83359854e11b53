"""--accum_steps K: one process trains as K processes would (gradient accumulation).

Micro-batch j of process r holds virtual process j * W + r's batch (datasets.sampling.
MicroBatchSampler); every micro-batch is normalised by its step's boxes per virtual process and
scaled by 1 / K (engine.train_step), so that one process with K = 2 gives the gradients and weights
of two gloo processes; steps, checkpoints and resumes count optimizer steps.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import BatchSampler

import engine
import main as train_main
from datasets.sampling import MicroBatchSampler, TrainingSampler
from datasets.synthetic import make_synthetic_coco
from models import build_model
from util.misc import nested_tensor_from_tensor_list

from dist_grad_check import fixed_batch
from e2e import TINY, parse, run_main
from test_train_eval import _free_port

ACCUM = 2                 # micro-batches per step of the one-process runs
PROCESSES = 2             # of the runs they are compared with
TINY_BATCH = int(TINY[TINY.index("--batch_size") + 1])
TRAIN_IMAGES = 12         # 3 steps of every plan below: 4 images per step
STEPS = TRAIN_IMAGES // (PROCESSES * TINY_BATCH)
SEED = 42
# name -> (--meta_arch, one process's flags, each of two processes' flags): the same 4 images per
# step. The last has both accumulate (DDP's no_sync): 4 virtual processes of 1 image each.
CASES = {
    "sam_detr": ("sam_detr", ["--accum_steps", str(ACCUM)], []),
    "detr": ("detr", ["--accum_steps", str(ACCUM)], []),
    "sam_detr_no_sync": ("sam_detr", ["--batch_size", "1", "--accum_steps", str(2 * ACCUM)],
                         ["--batch_size", "1", "--accum_steps", str(ACCUM)]),
}
# the one-process and two-process runs add the same float32 terms in other orders
GRAD_TOLERANCE = dict(rtol=1e-4, atol=1e-6)
WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as each of the two processes runs with: the same kernels' summation
    order, and no threads spinning on the cores that the other processes share (many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coco_dir(module_tmp) -> Path:
    root = module_tmp("shapes")
    make_synthetic_coco(out_dir=root, num_train=TRAIN_IMAGES, num_val=1, image_size=96, seed=11)
    return root


# ------------------------------------------------------------------------- the batches

@pytest.mark.parametrize("processes", [1, 2])
def test_micro_batches_are_the_batches_of_virtual_processes(processes: int):
    """Process r's micro-batch j of each step is virtual process j * W + r's batch of that step under
    W x K processes, from an epoch's start and after a mid-epoch checkpoint's items; an odd item count
    is padded as for W x K processes."""
    items, batch, accum = 29, 2, 3
    virtual = processes * accum

    def indices(batches) -> List[List[int]]:
        return [[key.index for key in keys] for keys in batches]

    def sampler(replicas: int, rank: int, start: int, accum_steps: int = 1) -> TrainingSampler:
        made = TrainingSampler(range(items), num_replicas=replicas, rank=rank, seed=SEED, accum_steps=accum_steps)
        made.set_epoch(3)
        made.start_at(start)
        return made

    for start in (0, batch * virtual):  # an epoch's start, and after one step
        by_virtual = [indices(BatchSampler(sampler(virtual, v, start), batch, drop_last=True)) for v in range(virtual)]
        steps = len(by_virtual[0])
        assert steps >= 1
        for rank in range(processes):
            micro_batches = MicroBatchSampler(sampler(processes, rank, start, accum), batch, accum)
            mine = indices(micro_batches)
            assert mine == [by_virtual[j * processes + rank][s] for s in range(steps) for j in range(accum)]
            assert len(micro_batches) == len(mine) == steps * accum


# ------------------------------------------------------------------------- the step

def test_micro_batches_give_the_gradient_and_log_of_their_union():
    """SAM-DETR's losses are sums over images divided by the boxes: a step of two micro-batches of
    equal-size images (the same padding) gives the gradient and the logged losses of one batch of all
    of them (class_error aside: a mean of the micro-batches' percentages, as over processes)."""
    images, targets = fixed_batch()
    torch.manual_seed(0)
    model, criterion, _ = build_model(parse("--coco_path", "unused"))
    model.train()
    steps = []
    for accum_steps in (1, ACCUM):
        share = len(images) // accum_steps
        (samples, first), *more = [(nested_tensor_from_tensor_list(images[i:i + share]), targets[i:i + share])
                                   for i in range(0, len(images), share)]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: both steps start alike
        logged = engine.train_step(model, criterion, samples, first, optimizer, torch.device("cpu"),
                                   more_micro_batches=more)
        steps.append((logged, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (whole, whole_grads), (accumulated, accumulated_grads) = steps
    assert len(whole_grads) == len(accumulated_grads) > 0
    for index, (grad, reference) in enumerate(zip(accumulated_grads, whole_grads)):
        torch.testing.assert_close(grad, reference, **GRAD_TOLERANCE, msg=f"parameter {index}")
    def summed_terms(logged: Dict[str, float]) -> Dict[str, float]:
        return {k: v for k, v in logged.items() if not k.startswith("class_error")}
    assert summed_terms(accumulated) == pytest.approx(summed_terms(whole), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------- one process = two processes

class FirstStepGrads:
    """Stands in for torch.nn.utils.clip_grad_norm_ (engine.train_step's clipping): keeps the
    gradients of its first call (the first optimizer step's, accumulated and all-reduced, before
    clipping) and counts its calls (one per optimizer step)."""

    def __init__(self):
        self.real = torch.nn.utils.clip_grad_norm_
        self.grads: Optional[List[Optional[torch.Tensor]]] = None
        self.calls = 0

    def __call__(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        if self.grads is None:
            self.grads = [None if p.grad is None else p.grad.clone() for p in parameters]
        self.calls += 1
        return self.real(parameters, max_norm, *args, **kwargs)

    def result(self) -> dict:
        return {"grads": self.grads, "calls": self.calls}


def _flags(arch: str, coco_dir, out: Path, *more) -> list:
    return ["--meta_arch", arch, "--coco_path", coco_dir, "--epochs", "1", "--output_dir", out, *more]


def _two_process_worker(rank: int, ports: Dict[str, int], coco_dir: str, out_root: str) -> None:
    """Rank `rank` of two gloo processes on 127.0.0.1: main.main() for each of CASES, each with a
    process group of its own (one start of the processes for all); rank 0 writes the first step's
    gradients to <case>/grads.pt."""
    torch.set_num_threads(1)  # see one_thread
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(PROCESSES), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    for case, port in ports.items():
        arch, _, flags = CASES[case]
        os.environ["MASTER_PORT"] = str(port)
        recorder = torch.nn.utils.clip_grad_norm_ = FirstStepGrads()
        out = Path(out_root) / case
        try:
            run_main(*_flags(arch, coco_dir, out, *flags))
        finally:
            torch.distributed.destroy_process_group()
            torch.nn.utils.clip_grad_norm_ = recorder.real
        if rank == 0:
            torch.save(recorder.result(), out / "grads.pt")


@pytest.fixture(scope="module")
def two_processes(coco_dir, module_tmp) -> Path:
    """One epoch of each of CASES with two gloo processes, in <case>/ of the folder returned."""
    out_root = module_tmp("two_processes")
    ports = {case: _free_port() for case in CASES}
    assert len(set(ports.values())) == len(CASES)
    mp.spawn(_two_process_worker, args=(ports, str(coco_dir), str(out_root)), nprocs=PROCESSES)
    return out_root


@pytest.mark.parametrize("case", CASES)
def test_one_process_accumulating_equals_two_processes(case, two_processes, coco_dir, tmp_path, monkeypatch):
    """The first step's gradients (before clipping), the weights and optimizer state after the epoch's
    steps, the step counts and the logged loss of one process with --accum_steps are those of two
    processes with the same global batches: the loss normalised by the global batch's boxes."""
    arch, flags, _ = CASES[case]
    recorder = FirstStepGrads()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorder)
    run_main(*_flags(arch, coco_dir, tmp_path, *flags))
    ddp = torch.load(two_processes / case / "grads.pt", weights_only=True)
    assert recorder.calls == ddp["calls"] == STEPS  # clipping once per optimizer step
    assert len(recorder.grads) == len(ddp["grads"]) > 0
    assert sum(g is not None and bool(g.any()) for g in recorder.grads) > len(recorder.grads) // 2
    for index, (grad, reference) in enumerate(zip(recorder.grads, ddp["grads"])):
        assert (grad is None) == (reference is None), index
        if grad is not None:
            torch.testing.assert_close(grad, reference, **GRAD_TOLERANCE, msg=f"parameter {index}")

    single = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    two = torch.load(two_processes / case / "checkpoint.pth", weights_only=True)
    assert single["global_step"] == two["global_step"] == STEPS
    for name, value in two["model"].items():
        torch.testing.assert_close(single["model"][name], value, **WEIGHT_TOLERANCE, msg=name)
    for index, state in two["optimizer"]["state"].items():
        assert single["optimizer"]["state"][index]["step"] == state["step"] == STEPS
    logged = [json.loads((out / "log.txt").read_text())["train_loss"] for out in (tmp_path, two_processes / case)]
    assert logged[0] == pytest.approx(logged[1], rel=1e-5)


# ------------------------------------------------------------------------- resumes

def test_mid_epoch_resume_with_accumulation_is_exact(coco_dir, tmp_path, monkeypatch, capsys):
    """A crash after a mid-epoch checkpoint (step 1 of 3) and --auto_resume give the weights of the
    uninterrupted run, bit for bit; the checkpoint counts optimizer steps and the images of their
    micro-batches. Another --accum_steps at that checkpoint regroups the rest of the epoch, said."""
    flags = ["--coco_path", coco_dir, "--epochs", "1", "--accum_steps", str(ACCUM), "--checkpoint_steps", "1",
             "--auto_resume"]
    run_main(*flags, "--output_dir", tmp_path / "straight")
    real_step, calls = engine.train_step, []

    def crash_at_step_2(*args, **kwargs):
        calls.append(len(kwargs["more_micro_batches"]) + 1)
        if len(calls) == 2:
            raise MemoryError("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", crash_at_step_2)
    with pytest.raises(MemoryError):
        run_main(*flags, "--output_dir", tmp_path / "split")
    assert calls == [ACCUM, ACCUM]  # one call per optimizer step, with all of its micro-batches
    mid = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=True)
    assert (mid["epoch"], mid["step"], mid["global_step"], mid["epoch_items"]) == (0, 1, 1, ACCUM * TINY_BATCH)
    shutil.copy(tmp_path / "split" / "checkpoint.pth", tmp_path / "mid_epoch.pth")
    monkeypatch.setattr(engine, "train_step", real_step)
    run_main(*flags, "--output_dir", tmp_path / "split")
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pth", weights_only=True)
    assert straight["global_step"] == split["global_step"] == STEPS
    for name, value in straight["model"].items():
        torch.testing.assert_close(split["model"][name], value, rtol=0, atol=0, msg=name)

    (tmp_path / "regrouped").mkdir()
    shutil.copy(tmp_path / "mid_epoch.pth", tmp_path / "regrouped" / "checkpoint.pth")
    capsys.readouterr()
    run_main(*flags, "--output_dir", tmp_path / "regrouped", "--accum_steps", "1", "--batch_size", "4")
    printed = capsys.readouterr().out
    assert "--accum_steps was 2 in the checkpoint and is 1 now: 1 is used" in printed
    assert ("with 1 process(es) x 2 images x 2 micro-batches per step and --seed 42; this run has 1 process(es) x 4 "
            "images per step and --seed 42: the epoch's remaining items follow in the same order") in printed
    assert torch.load(tmp_path / "regrouped" / "checkpoint.pth", weights_only=True)["global_step"] == STEPS


# ------------------------------------------------------------------------- the flag

@pytest.mark.parametrize("accum_steps", ["0", "-1"])
def test_accum_steps_below_one_is_refused(accum_steps, coco_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match=rf"--accum_steps must be >= 1 .*got {accum_steps}"):
        run_main("--coco_path", coco_dir, "--accum_steps", accum_steps)
    code = train_main.cli([*TINY, "--coco_path", str(coco_dir), "--check_only", "--accum_steps", accum_steps,
                           "--output_dir", str(tmp_path)])
    assert code == train_main.EXIT_NO_RETRY
    assert "--accum_steps must be >= 1" in capsys.readouterr().err
