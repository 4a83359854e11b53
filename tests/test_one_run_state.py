"""One run, one state: the decision of where a run starts (util/run_start.py), the rules of the flags a
checkpoint decides (util/resume.py), failures that repeat (util/attempts.py), evaluation as part of
the epoch, and the process-group start that every rendezvous meets (util.misc.generation_store).

Multi-process runs of these (two loopback nodes, c10d restarts) are in test_hard_faults.py."""
import datetime
import json
import threading
import time

import pytest
import torch
import torch.distributed as dist

import engine
import main as train_main
import util.misc as utils
from e2e import parse, run_main
from test_train_eval import _free_port, coco_dir  # noqa: F401 (a fixture)
from util import attempts, run_start
from util.step_control import HangWatchdog, process_group_timeout

# a batch of two that holds this training image "runs out of memory": with --seed 42, epoch 0's third
# batch, after two steps (see TrainingSampler.epoch_order)
FAILING_IMAGE_INDEX = 2


# ------------------------------------------------------------------------- evaluation needs weights

def test_eval_and_test_with_nothing_to_load_stop_naming_where_they_looked(coco_dir, tmp_path):
    for mode in ("--eval", "--test"):
        with pytest.raises(SystemExit, match=rf"--auto_resume looked for checkpoint.pth and checkpointNNNN.pth in "
                                             rf"{tmp_path}.*an untrained model is never evaluated"):
            run_main("--coco_path", coco_dir, mode, "--auto_resume", "--output_dir", tmp_path)
    assert not list(tmp_path.glob("detections_*"))
    with pytest.raises(SystemExit, match="--eval runs trained weights: give --resume"):
        run_main("--coco_path", coco_dir, "--eval")


# ------------------------------------------------------------------------- evaluation is part of the epoch

def _epochs_logged(out):
    return [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]


def test_a_run_killed_in_evaluation_resumes_into_it(coco_dir, tmp_path, monkeypatch):
    real = train_main.run_evaluation
    calls = []

    def killed_in_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("killed during evaluation")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_main, "run_evaluation", killed_in_the_second)
    flags = ["--coco_path", coco_dir, "--epochs", "2", "--output_dir", tmp_path, "--auto_resume"]
    with pytest.raises(MemoryError):
        run_main(*flags)
    assert _epochs_logged(tmp_path) == [0]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1  # the last epoch, trained
    stats = run_main(*flags)  # trains nothing: evaluates the final weights it missed
    assert _epochs_logged(tmp_path) == [0, 1] and stats is not None
    logged = json.loads((tmp_path / "log.txt").read_text().splitlines()[1])
    assert logged["train_loss"] > 0  # the epoch's training stats, kept in its checkpoint
    assert logged["test_coco_eval_bbox"] == pytest.approx(stats["coco_eval_bbox"])


def test_the_final_weights_are_always_evaluated(coco_dir, tmp_path):
    run_main("--coco_path", coco_dir, "--epochs", "2", "--output_dir", tmp_path, "--eval_every_epoch", "5")
    assert _epochs_logged(tmp_path) == [1]


# ------------------------------------------------------------------------- failures that repeat

def _out_of_memory_on(monkeypatch, index: int, batch: int):
    """engine.train_step fails on a batch of `batch` images that holds training image `index`."""
    real = engine.train_step

    def train_step(model, criterion, samples, targets, *args, **kwargs):
        ids = [int(t["image_id"]) for t in targets]
        if len(ids) == batch and index + 1 in ids:  # image ids are 1-based in the generated data
            raise RuntimeError("CUDA out of memory (simulated) at a large batch")
        return real(model, criterion, samples, targets, *args, **kwargs)
    monkeypatch.setattr(engine, "train_step", train_step)


def test_a_failure_that_repeats_stops_and_its_ways_out_work(coco_dir, tmp_path, monkeypatch, capsys):
    _out_of_memory_on(monkeypatch, FAILING_IMAGE_INDEX, batch=2)
    flags = ["--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path, "--auto_resume",
             "--checkpoint_steps", "1"]
    for _ in range(3):  # the first failure writes checkpoints up to the batch; two more from there
        with pytest.raises(RuntimeError, match="out of memory"):
            run_main(*flags)
    point = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    with pytest.raises(SystemExit) as stop:
        run_main(*flags)
    message = str(stop.value)
    assert f"failed 2 times in a row starting from the same point, epoch 0 after step {point['step']}" in message
    assert message.count("CUDA out of memory (simulated)") == 2 and "--batch_size" in message
    events = attempts.read(tmp_path)
    assert events[-1]["stopped"] == "repeated failures"
    assert [e["failed"]["step"] for e in events if "failed" in e] == [point["step"]] * 3
    # the way out: the same checkpoint with smaller batches (the rest of the epoch regrouped)
    run_main(*flags, "--batch_size", "1")
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert attempts.read(tmp_path)[-1]["completed"]


def test_resume_of_an_older_checkpoint_of_the_run_rewinds_once(coco_dir, tmp_path, capsys):
    flags = ["--coco_path", coco_dir, "--output_dir", tmp_path, "--auto_resume"]
    run_main(*flags, "--epochs", "3")
    older = tmp_path / "checkpoint0000.pth"
    kept = older.read_bytes()
    capsys.readouterr()
    run_main(*flags, "--epochs", "3", "--resume", older)
    printed = capsys.readouterr().out
    assert f"Resuming from {older}" in printed and "the run rewinds to it" in printed
    aside = tmp_path / "set_aside" / "attempt2"
    assert {p.name for p in aside.iterdir()} == {"checkpoint.pth", "checkpoint0001.pth", "checkpoint0002.pth",
                                                 "log.txt"}
    assert [json.loads(line)["epoch"] for line in (aside / "log.txt").read_text().splitlines()] == [1, 2]
    assert _epochs_logged(tmp_path) == [0, 1, 2]  # epochs 1 and 2 trained again
    assert older.read_bytes() == kept
    # the launcher's next restart passes the same --resume: the run continues, it does not rewind again
    run_main(*flags, "--epochs", "4", "--resume", older)
    printed = capsys.readouterr().out
    assert "already rewound the run to it" in printed and f"Resuming from {tmp_path / 'checkpoint.pth'}" in printed
    assert _epochs_logged(tmp_path) == [0, 1, 2, 3]


def test_repeated_failures_count_the_same_point_and_plan_only():
    point = attempts.StartPoint(3, 10, 70, (2, 4, 42))
    start = attempts.start_event(1, point, "checkpoint.pth")
    other_plan = attempts.start_event(2, attempts.StartPoint(3, 10, 70, (1, 4, 42)), "checkpoint.pth")
    same = [dict(start, attempt=k) for k in (3, 4)]
    events = [start, {"attempt": 1, "preempted": True}, other_plan, *same]
    assert [e["attempt"] for e in attempts.repeated_failures(events, point)] == [4, 3]
    assert attempts.repeated_failures(events + [{"attempt": 4, "completed": True}], point) == []


# ------------------------------------------------------------------------- flags at a resume

def test_a_resume_that_moves_parameters_between_optimizer_groups_stops(coco_dir, tmp_path):
    flags = ["--coco_path", coco_dir, "--epochs", "2", "--output_dir", tmp_path, "--auto_resume"]
    run_main(*flags[:3], "1", *flags[4:])
    for changed, named in ((["--lr_backbone", "0"], "--lr_backbone 1e-05 (now 0.0)"),
                           (["--lr_linear_proj_names", "query_embed"], "--lr_linear_proj_names [] (now ['query_embed'])")):
        with pytest.raises(SystemExit, match="would attach Adam's moments to other parameters") as stop:
            run_main(*flags, *changed)
        assert named in str(stop.value)


def test_every_rank_holds_the_same_state_or_the_run_stops(monkeypatch):
    model = torch.nn.Linear(2, 2)
    start = run_start.Start(path="run/checkpoint.pth", epoch=3, step=0)
    mine = ("run/checkpoint.pth", 3, 0, run_start.weights_checksum(model.state_dict()))
    monkeypatch.setattr(utils, "all_gather", lambda data: [mine, mine])
    run_start.verify_same_state(model, start)
    monkeypatch.setattr(utils, "all_gather", lambda data: [mine, mine, (mine[0], 2, 0, mine[3])])
    with pytest.raises(SystemExit, match=r"did not load the same state.*rank 2: \('run/checkpoint.pth', 2"):
        run_start.verify_same_state(model, start)


# ------------------------------------------------------------------------- process-group starts

def _group_start(port: int, world_size: int, timeout: datetime.timedelta) -> list:
    """Every rank's generation_store prefix, each rank in a thread with its own store client."""
    prefixes = [None] * world_size

    def rank(r):
        store = dist.TCPStore("127.0.0.1", port, world_size, False, timeout=timeout)
        prefixed = utils.generation_store(store, r, world_size, timeout)
        prefixed.set("probe", str(r))
        prefixes[r] = store.get(f"sam-detr/generation/{int(store.add('sam-detr/generation', 0))}/group/probe")
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout.total_seconds())
    return prefixes


def test_every_start_of_a_group_meets_under_a_new_prefix_of_its_own():
    """A store that outlives its group (torchrun's): a restarted group, whose ranks come up in any
    order and find their predecessors' questions there, agrees on a new prefix."""
    timeout = datetime.timedelta(seconds=20)
    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, 3, True, timeout=timeout, wait_for_workers=False)
    assert all(p is not None for p in _group_start(port, 3, timeout))
    server.set("sam-detr/generation/question/2", "a-dead-process-asked")  # left behind by a failed start
    assert all(p is not None for p in _group_start(port, 3, timeout))
    assert int(server.add("sam-detr/generation", 0)) == 2
    assert server.check(["sam-detr/generation/1/group/probe", "sam-detr/generation/2/group/probe"])


def test_nccl_gives_the_hang_watchdog_time_to_name_the_step():
    ten = datetime.timedelta(minutes=10)
    assert process_group_timeout("gloo", ten) == ten
    assert process_group_timeout("nccl", ten) > ten


def test_the_hang_watchdog_names_rank_epoch_and_step_of_a_stuck_device_wait():
    waits, said = utils.DeviceWaits(), []
    watchdog = HangWatchdog(datetime.timedelta(seconds=0.2), 3, 8, waits, poll_s=0.05, on_hang=said.append)
    watchdog.at(4, 17)
    time.sleep(0.4)
    assert said == []  # no device wait: a slow step (or compiling) never counts
    with waits:
        deadline = time.monotonic() + 5
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
    watchdog.close()
    assert said and "CollectiveTimeoutError: rank 3 of 8: at epoch 4, step 17" in said[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_hang_watchdog_sees_a_stuck_device_wait_on_a_gpu():
    """On a GPU the host's wait for the device (utils.HostCopy, as in every training step) releases
    the GIL: the watchdog thread runs, and speaks, while the main thread waits."""
    said = []
    watchdog = HangWatchdog(datetime.timedelta(seconds=1), 0, 1, poll_s=0.1, on_hang=said.append)
    watchdog.at(0, 5)
    torch.cuda._sleep(int(5e9))  # seconds of device time, as a collective that does not finish
    utils.HostCopy(torch.ones(1, device="cuda")).wait()
    watchdog.close()
    assert said and "at epoch 0, step 5" in said[0]


def test_only_the_backends_timeouts_count_as_collective_timeouts():
    assert engine.is_collective_timeout(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                                                     "6000ms for recv operation to complete"))
    assert engine.is_collective_timeout(RuntimeError("[Rank 0] Watchdog caught collective operation timeout: "
                                                     "WorkNCCL(SeqNum=7, OpType=ALLREDUCE) ran for 600010 milliseconds "
                                                     "before timing out."))
    assert not engine.is_collective_timeout(RuntimeError("CUDA error: the launch timed out and was terminated"))


def test_slurm_tasks_find_their_gpu_and_a_port_of_their_job():
    assert utils.slurm_local_device({"SLURM_LOCALID": "5"}, 13, 8) == 5
    assert utils.slurm_local_device({"SLURM_LOCALID": "5"}, 13, 1) == 0  # one GPU bound to each task
    assert utils.slurm_master_port({"SLURM_JOB_ID": "123456"}) == "23456"
    assert utils.slurm_master_port({"SLURM_JOB_ID": "123457"}) != utils.slurm_master_port({"SLURM_JOB_ID": "123456"})
    assert utils.slurm_master_port({"SLURM_JOB_ID": "1", "MASTER_PORT": "4000"}) == "4000"


def test_given_means_on_the_command_line():
    args = parse("--epochs", "50", "--smca")
    assert {"epochs", "smca"} <= set(args.given_flags) and "lr" not in args.given_flags
    from util.resume import adopt_model_flags
    taken = adopt_model_flags(args, {"epochs": 12, "smca": False, "dilation": True, "lr": 1.0},
                              set(args.given_flags))
    assert taken == {"dilation": True} and (args.epochs, args.smca, args.lr) == (50, True, 1e-4)
