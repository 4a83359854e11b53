"""Hard faults cost nothing but time: a process killed with SIGKILL mid-epoch (restarted by
`torchrun --max-restarts` under static or c10d rendezvous, or relaunched with --auto_resume)
finishes with weights and optimizer state bit-identical to an uninterrupted run; so do two "nodes"
on loopback, by torchrun and by slurm's variables, against one node, and two nodes whose
--output_dir is a folder of their own. Dropout is on: the random streams must be continued exactly.

The runs are subprocesses on the CPU (gloo), one thread each. What loopback cannot show: NCCL, a
network between machines, and a node that is gone (a killed process stands in for each).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from e2e import TINY
from test_train_eval import REPO, _free_port
from tools.make_synthetic_coco import make_synthetic_coco

# 16 images of 2 per step: 8 steps an epoch on one process, 4 on two; a checkpoint every 2 steps
RUN_FLAGS = [*TINY, "--dropout", "0.1", "--epochs", "3", "--checkpoint_steps", "2", "--eval_every_epoch", "100",
             "--print_freq", "1", "--auto_resume"]
RUN_TIMEOUT_S = 300
POLL_S = 0.01
MARKER = "SAMDETR_FAULT_TEST"  # tags this test's processes, to find the one to kill


@pytest.fixture(scope="module")
def data(module_tmp):
    root = module_tmp("faults_data")
    make_synthetic_coco(out_dir=root, num_train=16, num_val=2, image_size=128, seed=0)
    return root


def _env(tag: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_", "TORCHELASTIC"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), MARKER: tag, **extra}


def _main(data, out, *flags):
    return [sys.executable, "main.py", *RUN_FLAGS, "--coco_path", str(data), "--output_dir", str(out),
            *[str(f) for f in flags]]


def _torchrun(*launch_flags):
    return [sys.executable, "-m", "torch.distributed.run", *[str(f) for f in launch_flags]]


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == 0, output[-4000:]
    return output


def _run(cmd, env) -> str:
    return _finish(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True))


def _tagged_pids(tag: str, **wanted) -> list:
    """Processes whose environment has MARKER=tag and every `wanted` variable (a worker of torchrun
    has LOCAL_RANK; its data workers, forked from it, have it too but a parent with the same tag)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if env.get(MARKER) == tag and all(env.get(k) == v for k, v in wanted.items()):
            found[int(proc.name)] = parent
    return [pid for pid, parent in found.items() if parent not in found]


def _kill_after_first_checkpoint(process: subprocess.Popen, out: Path, tag: str, **wanted) -> None:
    """SIGKILL (no handler can see it) to the tagged process once the run's first mid-epoch
    checkpoint is on disk, while it trains the steps after it."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (out / "checkpoint.pth").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(POLL_S)
    victims = _tagged_pids(tag, **wanted)
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)


def _assert_bit_identical(a: Path, b: Path, name_a: str = "checkpoint.pth", name_b: str = "checkpoint.pth",
                          epoch: int = 2) -> None:
    """Two checkpoints (by default the final ones): every weight, optimizer moment and step count, the schedule."""
    first, second = (torch.load(p / n, map_location="cpu", weights_only=True) for p, n in ((a, name_a), (b, name_b)))
    assert (first["epoch"], first.get("step", 0)) == (second["epoch"], second.get("step", 0)) == (epoch, 0)
    assert first["model"].keys() == second["model"].keys()
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][name]), name
    states = first["optimizer"]["state"]
    assert states.keys() == second["optimizer"]["state"].keys() and len(states) > 50
    for index, state in states.items():
        for key, value in state.items():
            assert torch.equal(value, second["optimizer"]["state"][index][key]), (index, key)
    assert first["optimizer"]["param_groups"] == second["optimizer"]["param_groups"]
    assert first["lr_scheduler"] == second["lr_scheduler"]


@pytest.fixture(scope="module")
def one_process(data, module_tmp):
    """One process without data workers, never interrupted."""
    out = module_tmp("one_process")
    _run(_main(data, out), _env("ref1"))
    return out


@pytest.fixture(scope="module")
def two_processes(data, module_tmp):
    """torchrun, two processes on one node, never interrupted."""
    out = module_tmp("two_processes")
    _run(_torchrun("--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", _free_port(), "main.py",
                   *_main(data, out)[2:]), _env("ref2"))
    return out


@pytest.mark.slow
def test_one_process_with_a_worker_killed_and_relaunched_is_bit_identical(data, one_process, tmp_path):
    """SIGKILL to the training process (its data worker dies with it), then the same command again:
    the run finishes exactly where the uninterrupted run without workers finished."""
    cmd = _main(data, tmp_path, "--num_workers", 1)
    tag = f"kill1 {tmp_path}"
    env = _env(tag)
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _kill_after_first_checkpoint(process, tmp_path, tag)
    process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL
    output = _run(cmd, env)
    assert f"Resuming from {tmp_path / 'checkpoint.pth'}" in output
    _assert_bit_identical(one_process, tmp_path)


@pytest.mark.slow
def test_two_processes_killed_mid_epoch_restart_under_torchrun_bit_identical(data, two_processes, tmp_path):
    """SIGKILL to rank 1 mid-epoch: torchrun --max-restarts stops rank 0, starts both again, and
    they resume from the newest checkpoint; the result equals the uninterrupted two-process run."""
    cmd = _torchrun("--nproc_per_node", 2, "--max-restarts", 1, "--master_addr", "127.0.0.1",
                    "--master_port", _free_port(), "main.py", *_main(data, tmp_path)[2:])
    tag = f"kill2 {tmp_path}"  # its own: a process of an earlier test session is never taken for it
    process = subprocess.Popen(cmd, cwd=REPO, env=_env(tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    _kill_after_first_checkpoint(process, tmp_path, tag, LOCAL_RANK="1")
    output = _finish(process)
    assert f"Resuming from {tmp_path / 'checkpoint.pth'}" in output, output[-4000:]
    _assert_bit_identical(two_processes, tmp_path)


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback_equal_one_node(data, two_processes, tmp_path):
    """`torchrun --nnodes 2` started once per "node" (one process each, a data worker each)."""
    port = _free_port()
    nodes = [subprocess.Popen(_torchrun("--nnodes", 2, "--node_rank", node, "--nproc_per_node", 1,
                                        "--master_addr", "127.0.0.1", "--master_port", port, "main.py",
                                        *_main(data, tmp_path, "--num_workers", 1)[2:]),
                              cwd=REPO, env=_env(f"node{node}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for node in range(2)]
    for node in nodes:
        _finish(node)
    _assert_bit_identical(two_processes, tmp_path)


@pytest.mark.slow
def test_two_slurm_tasks_on_two_nodes_equal_one_node(data, two_processes, tmp_path):
    """What srun gives each task of a two-node step (scripts_slurm/launch.sh), without torchrun."""
    port = _free_port()
    tasks = [subprocess.Popen(_main(data, tmp_path), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True,
                              env=_env(f"task{task}", SLURM_PROCID=str(task), SLURM_LOCALID="0",
                                       SLURM_NODEID=str(task), SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                                       SLURM_NNODES="2", SLURM_STEP_NODELIST="localhost,127.0.0.1",
                                       SLURM_JOB_ID="4242", MASTER_PORT=str(port)))
             for task in range(2)]
    outputs = [_finish(task) for task in tasks]
    assert "distributed init (rank 0/2, gloo)" in outputs[0]
    _assert_bit_identical(two_processes, tmp_path)


@pytest.mark.slow
def test_nodes_with_output_folders_of_their_own_resume_from_rank_0s(data, two_processes, tmp_path):
    """--output_dir a folder of each node's own (the same relative path, other working folders): one
    epoch, then the same command with --epochs 2. Rank 0 decides for both and sends its checkpoint to
    the node that has none; the result equals the one-node run's after two epochs."""
    port = _free_port()

    def both_nodes(epochs: int, swapped: bool = False) -> list:
        nodes = []
        for node in range(2):
            folder = tmp_path / f"node{node}"
            folder.mkdir(exist_ok=True)
            flags = [str(f) for f in _main(data, "out", "--epochs", epochs)[2:]]
            nodes.append(subprocess.Popen(
                _torchrun("--nnodes", 2, "--node_rank", 1 - node if swapped else node, "--nproc_per_node", 1,
                          "--master_addr", "127.0.0.1", "--master_port", port, str(REPO / "main.py"), *flags),
                cwd=folder, env=_env(f"own{node}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        if swapped:
            return [node.communicate(timeout=RUN_TIMEOUT_S)[0] for node in nodes]
        return [_finish(node) for node in nodes]

    both_nodes(1)
    assert (tmp_path / "node0" / "out" / "checkpoint.pth").exists()
    assert not (tmp_path / "node1" / "out" / "checkpoint.pth").exists()
    node0, _ = both_nodes(2)
    assert "is not the same folder on every node (ranks [1]" in node0
    assert "Resuming from out/checkpoint.pth" in node0 and "sending rank 0's copy" in node0
    assert not (tmp_path / "node1" / "out" / "checkpoint.pth").exists()
    _assert_bit_identical(tmp_path / "node0" / "out", two_processes, name_b="checkpoint0001.pth", epoch=1)
    # rank 0 on the node without the run's folder: it stops, rather than start the run afresh
    moved = "".join(both_nodes(3, swapped=True))
    assert "rank 0 found no checkpoint in --output_dir out, but ranks [1] have checkpoints" in moved


@pytest.mark.slow
def test_c10d_restart_with_a_blocked_survivor_is_bit_identical(data, two_processes, tmp_path):
    """Two torchrun agents under c10d rendezvous (PyTorch's multi-node form, and what `srun ...
    torchrun` runs): rank 1 is killed while rank 0 is blocked as an NCCL rank would be (SIGSTOP, so
    that only SIGKILL ends it). The agents meet again under a new store prefix that both agree on
    (a node restarted because another failed counts no restart), and the run ends bit-identical to
    the uninterrupted one."""
    port = _free_port()
    tag = f"c10d {tmp_path}"
    agents = [subprocess.Popen(_torchrun("--nnodes", 2, "--nproc_per_node", 1, "--rdzv-backend", "c10d",
                                         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "faults",
                                         "--max-restarts", 1, "--monitor-interval", 0.5, "main.py",
                                         *_main(data, tmp_path)[2:]),
                               cwd=REPO, env=_env(tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (tmp_path / "checkpoint.pth").exists():
        assert all(a.poll() is None for a in agents) and time.monotonic() < deadline
        time.sleep(POLL_S)
    survivor, victim = (_tagged_pids(tag, RANK=str(rank)) for rank in (0, 1))
    assert len(survivor) == len(victim) == 1
    os.kill(survivor[0], signal.SIGSTOP)
    os.kill(victim[0], signal.SIGKILL)
    outputs = [_finish(agent) for agent in agents]
    assert sum(o.count(f"Resuming from {tmp_path / 'checkpoint.pth'}") for o in outputs) == 1, outputs[0][-3000:]
    _assert_bit_identical(two_processes, tmp_path)
