"""Defects that give wrong numbers or hangs on GPU clusters, reached on the CPU: which checkpoint
is evaluated or resumed, CUDA streams and devices (simulated), pinned batches, the preemption
poll under DDP (two gloo processes), diverged models, slurm launches without srun, tiny data,
resumes with changed flags and TensorBoard steps."""
import json
import os
import shutil
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import engine
import main as train_main
import util.misc as utils
from datasets.synthetic import make_synthetic_coco
from e2e import TINY, run_main
from main import get_args_parser, param_groups
from models import build_model
from util import run_start
from util.misc import HostCopy, NestedTensor, NonFiniteLossError, nested_tensor_from_tensor_list
from util.slurm import PreemptionFlag
from util.step_control import StepControl

TRAIN_IMAGES = 8  # 4 steps of TINY's batch of 2 per epoch
NAN = float("nan")


@pytest.fixture(scope="module")
def coco_dir(module_tmp):
    root = module_tmp("shapes")
    make_synthetic_coco(out_dir=root, num_train=TRAIN_IMAGES, num_val=2, image_size=96, seed=5)
    return root


@pytest.fixture(scope="module")
def two_epochs(coco_dir, module_tmp):
    """A 2-epoch run (lr drop after the first) that keeps both epochs' checkpoints."""
    out = module_tmp("two_epochs")
    run_main("--coco_path", coco_dir, "--epochs", "2", "--lr_drop", "1", "--output_dir", out)
    return out


def logged_epochs(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def preempt_at_call(monkeypatch, call: int):
    """The preemption poll answers True at its `call`-th call (1-based), False otherwise."""
    calls = []

    def poll(self):
        calls.append(1)
        return len(calls) == call
    monkeypatch.setattr(train_main.StepControl, "local_stop", poll)
    monkeypatch.setattr(train_main, "requeue_job", lambda: True)


# ------------------------------------------------------------------------- which checkpoint

def test_explicit_resume_wins_under_eval_with_auto_resume(two_epochs, coco_dir, capsys):
    # what the slurm launchers run: --auto_resume is always on
    first = two_epochs / "checkpoint0000.pth"
    stats = run_main("--coco_path", coco_dir, "--epochs", "2", "--eval", "--resume", first, "--auto_resume",
                     "--output_dir", two_epochs)
    assert f"Resuming from {first}" in capsys.readouterr().out
    epoch0, epoch1 = logged_epochs(two_epochs)
    assert stats["loss"] == pytest.approx(epoch0["test_loss"], rel=1e-5)
    assert stats["loss"] != pytest.approx(epoch1["test_loss"], rel=1e-5)


def test_checkpoint_choice_and_reason(tmp_path, monkeypatch):
    own = tmp_path / "checkpoint.pth"
    own.write_bytes(b"")
    monkeypatch.setattr(run_start, "load_checkpoint", lambda path, map_location=None: {"loaded": str(path)})

    def choice(*flags):
        path, why, _, _ = run_start._choose(get_args_parser().parse_args(["--output_dir", str(tmp_path), *flags]),
                                            tmp_path, [], 1)
        return path, why

    assert choice("--eval", "--auto_resume", "--resume", "a.pth")[0] == "a.pth"
    assert choice("--eval", "--auto_resume")[0] == str(own)
    path, why = choice("--auto_resume", "--resume", "a.pth")  # training: a requeued run continues itself
    assert path == str(own) and "--resume a.pth only starts a run" in why
    assert choice("--resume", "a.pth")[0] == "a.pth"
    own.unlink()
    assert choice("--auto_resume", "--resume", "a.pth")[0] == "a.pth"
    assert choice("--auto_resume") == ("", "")


# ------------------------------------------------------------------------- devices and streams

def test_host_copy_waits_on_the_stream_of_the_tensors_own_device(monkeypatch):
    """The event must be recorded on the stream the copy was queued on: the current stream of the
    tensor's device (cuda:1 here), not the current device's (cuda:0 when set_device never ran)."""
    recorded = {}

    class FakeEvent:
        def record(self, stream=None):
            recorded["stream"] = stream

        def synchronize(self):
            recorded["synchronized"] = True

    class FakeCudaTensor:
        is_cuda, device, shape, dtype = True, torch.device("cuda", 1), (3,), torch.float32

        def detach(self):
            return self

    class FakePinnedBuffer:
        def copy_(self, source, non_blocking=False):
            recorded["non_blocking"] = non_blocking

        def numpy(self):
            return "values"

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"current stream of {device}")
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: FakePinnedBuffer())
    assert HostCopy(FakeCudaTensor()).wait() == "values"
    assert recorded == {"stream": "current stream of cuda:1", "synchronized": True, "non_blocking": True}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_host_copy_of_a_second_gpu_tensor_is_complete():
    torch.cuda.set_device(0)
    x = torch.randn(4096, 4096, device="cuda:1")
    product = x @ x  # long enough that an early event would let the host read stale memory
    copy = HostCopy(product.sum(0))
    torch.testing.assert_close(torch.from_numpy(copy.wait()), product.sum(0).cpu())


def test_single_process_cuda_run_sets_its_device(monkeypatch, capsys):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    _clean_launch_env(monkeypatch)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    args = SimpleNamespace(device="cuda:1", dist_url="env://", world_size=1)
    utils.init_distributed_mode(args)
    assert chosen == [torch.device("cuda", 1)] and args.gpu == 1 and not args.distributed
    with pytest.raises(SystemExit, match="--device cuda:3: only 2 CUDA device"):
        utils.init_distributed_mode(SimpleNamespace(device="cuda:3", dist_url="env://", world_size=1))


# ------------------------------------------------------------------------- pinned batches

def test_nested_tensor_pins_images_and_mask(monkeypatch):
    pinned = []

    def pin(tensor):
        pinned.append(tuple(tensor.shape))
        return tensor.clone()
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    batch = nested_tensor_from_tensor_list([torch.ones(3, 4, 5), torch.ones(3, 6, 2)])
    out = batch.pin_memory()
    assert isinstance(out, NestedTensor) and pinned == [(2, 6, 5), (2, 3, 6, 5)]
    assert torch.equal(out.tensors, batch.tensors) and torch.equal(out.mask, batch.mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory)")
def test_data_loader_hands_back_pinned_batches():
    data = [(torch.rand(3, 8, 8 + i), {"labels": torch.tensor([i])}) for i in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=utils.collate_fn, pin_memory=True)
    samples, targets = next(iter(loader))
    assert samples.tensors.is_pinned() and samples.mask.is_pinned() and targets[0]["labels"].is_pinned()


def _control_worker(rank: int, world_size: int, port: int, signal_at: int, steps: int, out_dir: str,
                    backend: str) -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        flag = PreemptionFlag()
        control = StepControl(flag, checkpoint_minutes=1, device=device)
        # only rank 0's clock says a timed checkpoint is due, once
        control.checkpoint_due = lambda: rank == 0 and step[0] == signal_at
        saved, stops, step = [], [], [0]
        control.begin_epoch(0, steps + 1, saved.append)
        for step[0] in range(1, steps + 1):
            if rank == world_size - 1 and step[0] == signal_at:
                flag.requested = True  # only the last rank gets the signal
            stops.append(control.after_step(step[0]))
        control.end_epoch()
        gathered = utils.gather_to_main({rank: f"detections of rank {rank}"})  # --test's results, to rank 0
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump({"stops": stops, "saved": saved, "gathered": gathered}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two GPUs"))])
def test_step_control_agrees_across_ranks_one_step_later(tmp_path, backend):
    """The signal of one rank and the clock of another reach every rank at the same step (the next),
    over the default process group (on NCCL as device flags read a step later): every rank stops,
    and saves, at the same step. Results gathered for rank 0 reach rank 0 only."""
    world_size, signal_at, steps = 2, 2, 5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_control_worker, args=(world_size, port, signal_at, steps, str(tmp_path), backend), nprocs=world_size)
    for rank in range(world_size):
        answers = json.loads((tmp_path / f"{rank}.json").read_text())
        assert answers["stops"] == [step > signal_at for step in range(1, steps + 1)]
        assert answers["saved"][0] == signal_at + 1  # the due clock and the stop, both a step later
        assert answers["gathered"] == ([{"0": "detections of rank 0"}, {"1": "detections of rank 1"}] if rank == 0
                                       else [])


# ------------------------------------------------------------------------- a diverged model

def test_nan_weights_stop_with_the_projects_error_before_any_update():
    args = get_args_parser().parse_args(TINY)
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    with torch.no_grad():
        model.input_proj[0][0].weight.fill_(NAN)  # as a diverged run leaves them
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = nested_tensor_from_tensor_list([torch.rand(3, 64, 80), torch.rand(3, 72, 64)])
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.2, 0.2]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])}]
    with pytest.raises(NonFiniteLossError, match=r"not finite.*pred_logits of decoder layer.*at epoch 0, step 0"):
        engine.train_step(model, criterion, samples, targets, optimizer, torch.device("cpu"), args.clip_max_norm,
                          where=" at epoch 0, step 0")
    assert engine.NonFiniteLossError is NonFiniteLossError
    assert not optimizer.state
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


# ------------------------------------------------------------------------- launches and data

def _clean_launch_env(monkeypatch):
    """No launcher variables; those init_distributed_mode sets are removed again after the test."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NUM_TASKS",
                "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_LOCALID"):
        monkeypatch.setenv(var, "")  # records the variable's state, so that undo restores it
        monkeypatch.delenv(var)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: pytest.fail(f"init_process_group({kwargs})"))


def test_sbatch_script_without_srun_runs_one_process(monkeypatch, capsys):
    _clean_launch_env(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # sbatch --ntasks 4, then `python main.py` without srun
    args = SimpleNamespace(device="cpu", dist_url="env://", world_size=1)
    utils.init_distributed_mode(args)
    assert not args.distributed and args.world_size == 1
    assert "not started by srun" in capsys.readouterr().out


def test_srun_step_gives_rank_world_size_and_master(monkeypatch):
    _clean_launch_env(monkeypatch)
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(dist, "rendezvous", lambda url, rank, world_size, timeout: iter([("store", rank, world_size)]))
    monkeypatch.setattr(utils, "generation_store", lambda store, rank, world_size, timeout: f"{store} of this start")
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(utils, "setup_for_distributed", lambda is_master: None)
    # a job of 8 tasks, of which this srun step uses 2 on two nodes
    for var, value in (("SLURM_PROCID", "1"), ("SLURM_NTASKS", "8"), ("SLURM_STEP_NUM_TASKS", "2"),
                       ("SLURM_LOCALID", "0"), ("SLURM_STEP_NODELIST", "gpu[07-08]")):
        monkeypatch.setenv(var, value)
    args = SimpleNamespace(device="cpu", dist_url="env://", world_size=1)
    utils.init_distributed_mode(args)
    assert args.distributed and (args.rank, args.world_size) == (1, 2)
    assert calls[0]["world_size"] == 2 and calls[0]["backend"] == "gloo"
    assert calls[0]["store"] == "store of this start"
    assert os.environ["MASTER_ADDR"] == "gpu07"


def test_training_set_smaller_than_a_batch_is_explained(coco_dir, tmp_path):
    with pytest.raises(SystemExit, match=rf"{TRAIN_IMAGES} images.*less than one batch of --batch_size 9"):
        run_main("--coco_path", coco_dir, "--epochs", "1", "--batch_size", "9", "--output_dir", tmp_path)


# ------------------------------------------------------------------------- resumes

def test_mid_epoch_resume_with_another_batch_plan_continues_the_epoch(coco_dir, tmp_path, monkeypatch, capsys):
    """A way out of a failure that repeats: a mid-epoch checkpoint continues with another --batch_size
    (the epoch's remaining images, in the same order, in other batches) or --seed (redrawn), said."""
    preempt_at_call(monkeypatch, 2)
    with pytest.raises(SystemExit) as stop:
        run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path, "--auto_resume")
    assert stop.value.code == 0
    preempted = tmp_path / "preempted.pth"
    shutil.copy(tmp_path / "checkpoint.pth", preempted)
    assert torch.load(preempted, weights_only=True)["epoch_items"] == 4  # 2 steps of 2 of the 8 images
    monkeypatch.setattr(train_main.StepControl, "local_stop", lambda control: False)
    read = []
    real_getitem = train_main.TrainingSampler.__iter__

    def recording_iter(sampler):
        keys = list(real_getitem(sampler))
        read.append([key.index for key in keys])
        return iter(keys)
    monkeypatch.setattr(train_main.TrainingSampler, "__iter__", recording_iter)
    capsys.readouterr()
    run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path, "--auto_resume", "--batch_size", "4")
    printed = capsys.readouterr().out
    assert "the epoch's remaining items follow in the same order, grouped into other batches" in printed
    assert "Epoch: [0]  [0/1]" in printed  # the 4 remaining images, one batch of 4
    sampler = train_main.TrainingSampler(list(range(TRAIN_IMAGES)), num_replicas=1, rank=0, seed=42)
    assert read[0] == sampler.epoch_order()[4:]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["global_step"] == 3

    shutil.copy(preempted, tmp_path / "checkpoint.pth")
    run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path, "--auto_resume", "--seed", "7")
    assert "the rest of the epoch is drawn afresh from the new seed's order" in capsys.readouterr().out

    # more images done than an epoch has (the data changed): named, not an empty-sequence crash
    ckpt = torch.load(preempted, weights_only=True)
    torch.save({**ckpt, "epoch_items": 40}, tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match="after 40 items of epoch 0, but an epoch has 8 now"):
        run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path, "--auto_resume")


def _resume_epoch_one(two_epochs, coco_dir, out, *flags):
    """Continues the first epoch's checkpoint of `two_epochs` for one more epoch in `out`."""
    out.mkdir()
    shutil.copy(two_epochs / "checkpoint0000.pth", out / "checkpoint.pth")
    run_main("--coco_path", coco_dir, "--epochs", "2", "--output_dir", out, "--auto_resume", *flags)
    return torch.load(out / "checkpoint.pth", weights_only=True)


def test_changed_schedule_flags_are_reported_and_kept(two_epochs, coco_dir, tmp_path, capsys):
    ckpt = _resume_epoch_one(two_epochs, coco_dir, tmp_path / "kept", "--lr_drop", "5", "--lr", "2e-4")
    printed = capsys.readouterr().out
    assert "--lr_drop was 1 in the checkpoint and is 5 now: the checkpoint's 1 is kept" in printed
    assert "--lr was 0.0001 in the checkpoint and is 0.0002 now" in printed
    straight = torch.load(two_epochs / "checkpoint.pth", weights_only=True)
    assert ckpt["lr_scheduler"]["step_size"] == 1
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [g["lr"] for g in straight["optimizer"]["param_groups"]]


def test_override_resumed_schedule_uses_the_new_flags(two_epochs, coco_dir, tmp_path, capsys):
    ckpt = _resume_epoch_one(two_epochs, coco_dir, tmp_path / "override", "--lr_drop", "5", "--lr", "2e-4",
                             "--override_resumed_schedule")
    assert "--lr_drop was 1 in the checkpoint and is 5 now: 5 is used" in capsys.readouterr().out
    assert ckpt["lr_scheduler"]["step_size"] == 5
    # two epochs done, no drop before epoch 5: the new base rates, undecayed
    lrs = [g["lr"] for g in ckpt["optimizer"]["param_groups"]]
    assert lrs[0] == pytest.approx(2e-4) and lrs[1] == pytest.approx(1e-5)


class StepRecorder:
    """Stands in for TensorBoard's SummaryWriter: keeps the steps of train/loss."""
    writers = []

    def __init__(self, log_dir, purge_step=None):
        self.purge_step, self.steps = purge_step, []
        StepRecorder.writers.append(self)

    def add_scalar(self, tag, value, step):
        if tag == "train/loss":
            self.steps.append(step)

    def flush(self):
        pass

    def close(self):
        pass


def test_tensorboard_steps_never_go_back_across_a_resume(coco_dir, tmp_path, monkeypatch):
    import torch.utils.tensorboard
    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", StepRecorder)
    StepRecorder.writers = []
    preempt_at_call(monkeypatch, 3)
    with pytest.raises(SystemExit):
        run_main("--coco_path", coco_dir, "--epochs", "2", "--output_dir", tmp_path, "--auto_resume", "--tensorboard")
    monkeypatch.setattr(train_main.StepControl, "local_stop", lambda control: False)
    run_main("--coco_path", coco_dir, "--epochs", "2", "--output_dir", tmp_path, "--auto_resume", "--tensorboard")
    first, resumed = StepRecorder.writers
    assert first.steps == [1, 2, 3] and first.purge_step is None
    assert resumed.purge_step == 3 and resumed.steps == list(range(4, 9))
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["global_step"] == 8
