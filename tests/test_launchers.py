"""The launchers of scripts/ (torchrun) and scripts_slurm/ (srun): each runs main.py with its
configuration's flags (architecture included), GPU count, per-GPU batch and an output folder of
its own.

torchrun and srun are replaced by stand-ins on PATH that record their arguments, so nothing is
trained: the test reads what the launcher would have started.
"""
import argparse
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Set

import pytest

from main import get_args_parser
from models import apply_meta_arch_defaults

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"scripts": "torchrun", "scripts_slurm": "srun"}
RECORD_ENV = "LAUNCH_RECORD"
LAUNCH_TIMEOUT_S = 60


class Launcher(NamedTuple):
    """What a launcher starts: the README's Training table."""
    gpus: int
    batch: int  # images per GPU
    switches: Set[str]
    epochs: int
    lr_drop: int
    meta_arch: str = "sam_detr"


DETR_TOTAL_BATCH = 64  # DETR's published 500-epoch models: 32 GPUs x 2 (R50), 64 x 1 (R50-DC5)
# script name -> Launcher fields, in order
_LAUNCHER_ROWS = {
    "r50_e12_4gpu": (4, 4, set(), 12, 10),
    "r50_e50_4gpu": (4, 4, set(), 50, 40),
    "r50_smca_e12_4gpu": (4, 4, {"smca"}, 12, 10),
    "r50_smca_e50_4gpu": (4, 4, {"smca"}, 50, 40),
    "r50_dc5_e12_8gpu": (8, 1, {"dilation"}, 12, 10),
    "r50_dc5_e50_8gpu": (8, 1, {"dilation"}, 50, 40),
    "r50_dc5_smca_e12_8gpu": (8, 1, {"dilation", "smca"}, 12, 10),
    "r50_dc5_smca_e50_8gpu": (8, 1, {"dilation", "smca"}, 50, 40),
    "r50_ms_e12_8gpu": (8, 2, {"multiscale"}, 12, 10),
    "r50_ms_e50_8gpu": (8, 2, {"multiscale"}, 50, 40),
    "r50_ms_smca_e12_8gpu": (8, 2, {"multiscale", "smca"}, 12, 10),
    "r50_ms_smca_e50_8gpu": (8, 2, {"multiscale", "smca"}, 50, 40),
    # the original DETR: its own recipe, and SAM-DETR's for a comparison at the same schedule
    "detr_r50_e500_32gpu": (32, 2, set(), 500, 400, "detr"),
    "detr_r50_dc5_e500_64gpu": (64, 1, {"dilation"}, 500, 400, "detr"),
    "detr_r50_e12_4gpu": (4, 4, set(), 12, 10, "detr"),
    "detr_r50_e50_4gpu": (4, 4, set(), 50, 40, "detr"),
    "detr_r50_dc5_e12_8gpu": (8, 1, {"dilation"}, 12, 10, "detr"),
    "detr_r50_dc5_e50_8gpu": (8, 1, {"dilation"}, 50, 40, "detr"),
}
LAUNCHERS = {name: Launcher(*row) for name, row in _LAUNCHER_ROWS.items()}
SWITCHES = ("smca", "dilation", "multiscale")
GPUS_PER_NODE = 8  # the launchers' default
MULTI_NODE_ENV = {"NODE_RANK": "0", "MASTER_ADDR": "node0.example"}  # torchrun over several nodes


def _stand_in(bin_dir: Path, command: str) -> None:
    """An executable `command` that writes its arguments, one a line, to $LAUNCH_RECORD."""
    path = bin_dir / command
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "${RECORD_ENV}"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _checker(bin_dir: Path, status: int) -> str:
    """A stand-in for the `python` that runs `main.py ... --check_only`: records its arguments in
    bin_dir/check.txt and exits with `status`."""
    path = bin_dir / f"check{status}"
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{bin_dir / "check.txt"}"\nexit {status}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _launch(script: Path, tmp_path: Path, extra_env: Optional[dict] = None) -> list:
    """Runs `script` with the stand-ins; -> the arguments the launcher gave torchrun or srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for command in FOLDERS.values():
        _stand_in(bin_dir, command)
    record = tmp_path / "record.txt"
    outside_slurm = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    env = {**outside_slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORD_ENV: str(record),
           "OUTPUT_ROOT": str(tmp_path / "output"), "PYTHON": _checker(bin_dir, 0), **(extra_env or {})}
    subprocess.run([str(script)], env=env, check=True, timeout=LAUNCH_TIMEOUT_S, capture_output=True)
    return record.read_text().splitlines()


def _value(launched: list, prefix: str, default: Optional[int] = None) -> int:
    """The integer of the launcher argument `prefix`=N; `default` when there is none."""
    values = [int(a[len(prefix):]) for a in launched if a.startswith(prefix)]
    if not values and default is not None:
        return default
    assert len(values) == 1, (prefix, launched)
    return values[0]


def _gpus(folder: str, launched: list) -> int:
    if folder == "scripts":  # processes per node times nodes
        return _value(launched, "--nproc_per_node=") * _value(launched, "--nnodes=", default=1)
    return _value(launched, "--ntasks=")


def _main_args(launched: list) -> argparse.Namespace:
    """main.py's flags as main.py would parse them."""
    flags = launched[launched.index("main.py") + 1:]
    return argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(flags)


def test_every_launcher_is_listed():
    for folder in FOLDERS:
        found = {p.stem for p in (ROOT / folder).glob("*.sh")} - {"launch"}
        assert found == set(LAUNCHERS), folder


@pytest.mark.parametrize("folder", list(FOLDERS))
@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_starts_its_configuration(folder, name, tmp_path):
    script = ROOT / folder / f"{name}.sh"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    expected = LAUNCHERS[name]
    multi_node = expected.gpus > GPUS_PER_NODE
    launched = _launch(script, tmp_path, MULTI_NODE_ENV if multi_node else None)
    args = _main_args(launched)
    assert _gpus(folder, launched) == expected.gpus
    assert (args.batch_size, args.epochs, args.lr_drop) == (expected.batch, expected.epochs, expected.lr_drop)
    assert {s for s in SWITCHES if getattr(args, s)} == expected.switches
    assert args.meta_arch == expected.meta_arch
    apply_meta_arch_defaults(args)  # no flag the architecture refuses
    if multi_node:  # GPUS_PER_NODE processes on each node
        per_node = "--nproc_per_node=" if folder == "scripts" else "--ntasks-per-node="
        assert _value(launched, per_node) == GPUS_PER_NODE
    # its own folder, named after the script without the GPU count
    exp_name = name.rsplit("_", 1)[0]
    assert Path(args.output_dir) == tmp_path / "output" / exp_name
    assert (tmp_path / "output" / exp_name / "detailed_log.txt").exists()
    assert args.auto_resume  # a relaunch or a restart continues the run


def test_detr_launchers_reproduce_detr_total_batch():
    for name, launcher in LAUNCHERS.items():
        if name.startswith("detr_") and launcher.epochs == 500:
            assert launcher.gpus * launcher.batch == DETR_TOTAL_BATCH, name


def test_torchrun_over_several_nodes_needs_node_rank_and_master_addr(tmp_path):
    script = ROOT / "scripts" / "detr_r50_e500_32gpu.sh"
    with pytest.raises(subprocess.CalledProcessError) as error:
        _launch(script, tmp_path)
    assert "NODE_RANK" in error.value.stderr.decode() and "MASTER_ADDR" in error.value.stderr.decode()
    # node 1 of 4: its own log file, the same rendezvous
    launched = _launch(script, tmp_path, {"NODE_RANK": "1", "MASTER_ADDR": "node0.example"})
    assert {"--nnodes=4", "--node_rank=1", "--master_addr=node0.example", "--nproc_per_node=8",
            "--master_port=29500"} <= set(launched)
    assert (tmp_path / "output" / "detr_r50_e500" / "detailed_log_node1.txt").exists()
    # inside a slurm job, a port of the job's own: two jobs sharing a node do not meet
    launched = _launch(script, tmp_path, {"NODE_RANK": "0", "MASTER_ADDR": "node0", "SLURM_JOB_ID": "4242"})
    assert "--master_port=24242" in launched


def test_single_node_launchers_ignore_a_larger_gpus_per_node(tmp_path):
    launched = _launch(ROOT / "scripts" / "r50_e12_4gpu.sh", tmp_path, {"GPUS_PER_NODE": "8"})
    assert "--nproc_per_node=4" in launched and not any(a.startswith("--nnodes") for a in launched)
    assert "--standalone" in launched  # a free port of its own
    launched = _launch(ROOT / "scripts" / "r50_e12_4gpu.sh", tmp_path, {"MASTER_PORT": "31000"})
    assert "--master_port=31000" in launched and "--standalone" not in launched


def test_torchrun_launcher_checks_the_command_before_starting_it(tmp_path):
    """A mistake (a flag, a data path) stops at once, instead of being restarted MAX_RESTARTS times."""
    launched = _launch(ROOT / "scripts" / "r50_e12_4gpu.sh", tmp_path, {"COCO_PATH": "/data/coco"})
    checked = (tmp_path / "bin" / "check.txt").read_text().splitlines()
    assert checked[0] == "main.py" and checked[-1] == "--check_only"
    assert checked[1:-1] == launched[launched.index("main.py") + 1:]
    (tmp_path / "record.txt").unlink()
    done = subprocess.run([str(ROOT / "scripts" / "r50_e12_4gpu.sh")], timeout=LAUNCH_TIMEOUT_S, capture_output=True,
                          env={**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                               RECORD_ENV: str(tmp_path / "record.txt"), "OUTPUT_ROOT": str(tmp_path / "output"),
                               "PYTHON": _checker(tmp_path / "bin", 2)})
    assert done.returncode == 2 and not (tmp_path / "record.txt").exists()  # torchrun never started


def test_main_check_only_names_a_missing_path(tmp_path):
    """main.py --check_only as the launcher runs it: flags and paths, exit status 2 and the path."""
    done = subprocess.run([sys.executable, "main.py", "--coco_path", str(tmp_path / "nowhere"), "--check_only"],
                          cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 2 and f"missing {tmp_path / 'nowhere'}" in done.stderr


def _failing_srun(bin_dir: Path, failures: int, status: int = 137, stopped: bool = False) -> Path:
    """An srun that fails (status 137, as after SIGKILL) `failures` times, then succeeds; each call
    appends its main.py flags, one call a line, to the file it returns. `stopped`: each failure
    also leaves main.py's stopped.txt in the output folder, as when rank 0 stops the run itself."""
    bin_dir.mkdir(exist_ok=True)
    calls = bin_dir / "calls.txt"
    script = bin_dir / "srun"
    leave = ('out=$(echo "$*" | sed -e "s/.*--output_dir \\([^ ]*\\).*/\\1/"); echo "a flag is wrong" > "$out/stopped.txt"; '
             if stopped else "")
    script.write_text('#!/usr/bin/env bash\n'
                      f'echo "$*" >> "{calls}"\n'
                      f'(( $(wc -l < "{calls}") > {failures} )) || {{ {leave}exit {status}; }}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return calls


@pytest.mark.parametrize("failures, restarts, succeeds", [(2, 3, True), (5, 2, False)])
def test_slurm_launcher_starts_a_failed_step_again(tmp_path, failures, restarts, succeeds):
    """A hard failure (the step's status non-zero) starts srun again with --auto_resume, up to
    MAX_RESTARTS times; then the launcher gives up with the step's status."""
    calls = _failing_srun(tmp_path / "bin", failures)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "OUTPUT_ROOT": str(tmp_path / "output"), "MAX_RESTARTS": str(restarts)}
    done = subprocess.run([str(ROOT / "scripts_slurm" / "r50_e12_4gpu.sh")], env=env, timeout=LAUNCH_TIMEOUT_S,
                          capture_output=True, text=True)
    started = calls.read_text().splitlines()
    assert len(started) == (failures + 1 if succeeds else restarts + 1)
    assert all("--auto_resume" in call and "--output_dir" in call for call in started)
    assert done.returncode == (0 if succeeds else 137)
    log = (tmp_path / "output" / "r50_e12" / "detailed_log.txt").read_text()
    assert log.count("starting it again") == len(started) - 1
    assert ("giving up" in log) != succeeds


def test_torchrun_launchers_restart_and_resume(tmp_path):
    launched = _launch(ROOT / "scripts" / "r50_e12_4gpu.sh", tmp_path, {"MAX_RESTARTS": "5"})
    assert _value(launched, "--max-restarts=") == 5 and _main_args(launched).auto_resume


@pytest.mark.parametrize("status, stopped", [(2, False), (1, True)])
def test_slurm_launcher_does_not_start_a_stopped_run_again(tmp_path, status, stopped):
    """main.py stopped the run itself (exit status 2, or its stopped.txt when another task's status
    won): a configuration error or a failure that repeats is not retried."""
    calls = _failing_srun(tmp_path / "bin", 5, status=status, stopped=stopped)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "OUTPUT_ROOT": str(tmp_path / "output")}
    done = subprocess.run([str(ROOT / "scripts_slurm" / "r50_e12_4gpu.sh")], env=env, timeout=LAUNCH_TIMEOUT_S,
                          capture_output=True, text=True)
    assert len(calls.read_text().splitlines()) == 1 and done.returncode == status
    assert "not starting it again" in done.stderr
    assert ("a flag is wrong" in done.stderr) == stopped
