"""tools/plot_logs.py: curves from fake log.txt files, and clear errors for bad logs."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tools import plot_logs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent


def fake_entry(epoch: int, scale: float) -> dict:
    """One log line with the official keys; losses fall and AP rises with the epoch."""
    terms = {"loss_ce": 1.0 * scale / (epoch + 1), "loss_bbox": 0.5 * scale / (epoch + 1),
             "loss_giou": 0.8 * scale / (epoch + 1)}
    terms["loss"] = sum(terms.values())
    ap = [min(0.9, 0.05 * (epoch + 1) / scale)] * 12
    return {**{f"train_{k}": v for k, v in terms.items()}, **{f"test_{k}": 1.1 * v for k, v in terms.items()},
            "train_lr": 1e-4, "test_coco_eval_bbox": ap, "epoch": epoch, "n_parameters": 1234}


def write_run(root: Path, name: str, epochs: int, scale: float) -> Path:
    run = root / name
    run.mkdir(parents=True)
    lines = [json.dumps(fake_entry(e, scale)) for e in range(epochs)]
    (run / "log.txt").write_text("\n".join(lines) + "\n")
    return run


def test_two_runs_make_a_png(tmp_path):
    runs = [write_run(tmp_path, "run_a", 5, 1.0), write_run(tmp_path, "run_b", 3, 2.0)]
    out = plot_logs.main([*map(str, runs), "--out", str(tmp_path / "plots" / "curves.png")])
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    with Image.open(out) as image:
        width, height = image.size
    assert 1000 <= width <= 2000 and 500 <= height <= 1200  # 3 x 2 grid of panels


def test_series_of_fields():
    log = [fake_entry(0, 1.0), {"epoch": 1, "train_loss": 0.5}, fake_entry(2, 1.0)]
    series = plot_logs.field_series(log, "loss")
    assert series["train"][0] == [0.0, 1.0, 2.0]
    assert series["test"][0] == [0.0, 2.0]  # epochs without evaluation are skipped
    assert plot_logs.field_series(log, "AP50")[""][1] == pytest.approx([5.0, 15.0])  # percent
    assert plot_logs.field_series(log, "train_lr")[""][1] == [1e-4, 1e-4]
    assert plot_logs.field_series(log, "nonexistent") == {}


def test_command_line_with_fields(tmp_path):
    run = write_run(tmp_path, "run_a", 2, 1.0)
    out = tmp_path / "ap.png"
    subprocess.run([sys.executable, str(REPO / "tools" / "plot_logs.py"), str(run), "--out", str(out),
                    "--fields", "AP", "AP75", "train_lr"], check=True, capture_output=True, cwd=tmp_path)
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_unknown_field_lists_the_keys(tmp_path):
    run = write_run(tmp_path, "run_a", 2, 1.0)
    with pytest.raises(SystemExit, match="--fields mAP.*train_loss_giou"):
        plot_logs.main([str(run), "--out", str(tmp_path / "x.png"), "--fields", "mAP"])


def test_malformed_line_names_file_and_line(tmp_path):
    run = write_run(tmp_path, "run_a", 3, 1.0)
    log = run / "log.txt"
    lines = log.read_text().splitlines()
    lines[1] = lines[1][:40]  # a line cut short, as by a crash mid-write
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{log}:2: malformed line")):
        plot_logs.main([str(run), "--out", str(tmp_path / "x.png")])


def test_missing_and_empty_logs(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope" / "log.txt"))):
        plot_logs.read_log(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.txt").write_text("\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'empty' / 'log.txt'}: empty log")):
        plot_logs.read_log(tmp_path / "empty")
    (tmp_path / "empty" / "log.txt").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=":1: expected a JSON object"):
        plot_logs.read_log(tmp_path / "empty")


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "plot_logs.py"), str(tmp_path),
                             "--out", str(tmp_path / "x.png")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {tmp_path / 'log.txt'}: no such file " \
                                    f"(is {tmp_path} a run directory of main.py?)"


def test_same_folder_names_use_paths(tmp_path):
    assert plot_logs.run_names([tmp_path / "a" / "out", tmp_path / "b" / "out"]) == \
        [str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out")]
