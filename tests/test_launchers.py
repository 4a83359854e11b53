"""The launchers of scripts/ (torchrun) and scripts_slurm/ (srun): each runs main.py with its
configuration's flags, GPU count, per-GPU batch and an output folder of its own.

torchrun and srun are replaced by stand-ins on PATH that record their arguments, so nothing is
trained: the test reads what the launcher would have started.
"""
import argparse
import os
import stat
import subprocess
from pathlib import Path

import pytest

from main import get_args_parser

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"scripts": "torchrun", "scripts_slurm": "srun"}
RECORD_ENV = "LAUNCH_RECORD"
LAUNCH_TIMEOUT_S = 60

# script name -> (GPUs, images per GPU, switches on, epochs, lr_drop): the README's Training table
LAUNCHERS = {
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
}
SWITCHES = ("smca", "dilation", "multiscale")


def _stand_in(bin_dir: Path, command: str) -> None:
    """An executable `command` that writes its arguments, one a line, to $LAUNCH_RECORD."""
    path = bin_dir / command
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "${RECORD_ENV}"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _launch(script: Path, tmp_path: Path) -> list:
    """Runs `script` with the stand-ins; -> the arguments the launcher gave torchrun or srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for command in FOLDERS.values():
        _stand_in(bin_dir, command)
    record = tmp_path / "record.txt"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORD_ENV: str(record),
           "OUTPUT_ROOT": str(tmp_path / "output")}
    subprocess.run([str(script)], env=env, check=True, timeout=LAUNCH_TIMEOUT_S, capture_output=True)
    return record.read_text().splitlines()


def _gpus(folder: str, launched: list) -> int:
    prefix = "--nproc_per_node=" if folder == "scripts" else "--ntasks="
    return int(next(a for a in launched if a.startswith(prefix))[len(prefix):])


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
    gpus, batch, switches, epochs, lr_drop = LAUNCHERS[name]
    launched = _launch(script, tmp_path)
    args = _main_args(launched)
    assert _gpus(folder, launched) == gpus
    assert (args.batch_size, args.epochs, args.lr_drop) == (batch, epochs, lr_drop)
    assert {s for s in SWITCHES if getattr(args, s)} == switches
    # its own folder, named after the script without the GPU count
    exp_name = name.rsplit("_", 1)[0]
    assert Path(args.output_dir) == tmp_path / "output" / exp_name
    assert (tmp_path / "output" / exp_name / "detailed_log.txt").exists()
    assert args.auto_resume == (folder == "scripts_slurm")
