"""tools/make_docs_figures.py: the README's pictures from a run's log and demo output."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from datasets.synthetic import make_synthetic_coco
from test_plot_logs import write_run
from tools import make_docs_figures

MAX_BYTES = 150_000  # each picture; the README's two stay small in git
BOX = [10.0, 12.0, 50.0, 60.0]


def test_pictures_from_a_run(tmp_path):
    make_synthetic_coco(out_dir=tmp_path / "shapes", num_train=0, num_val=3, image_size=96, seed=0)
    files = sorted((tmp_path / "shapes" / "val2017").glob("*.jpg"))
    run = write_run(tmp_path, "run", epochs=4, scale=1.0)
    (run / "demo").mkdir()
    records = [{"image": str(f), "detections": [{"label": 1, "name": "circle", "score": 0.9, "box_xyxy": BOX}]}
               for f in files]
    (run / "demo" / "detections.json").write_text(json.dumps(records))
    demo_png, curves_png = make_docs_figures.main(["--run", str(run), "--out", str(tmp_path / "docs"),
                                                   "--num_images", "2"])
    assert all(0 < p.stat().st_size < MAX_BYTES for p in (demo_png, curves_png))
    with Image.open(files[0]) as first, Image.open(demo_png) as mosaic:
        scale = make_docs_figures.ENLARGE
        assert mosaic.height == scale * max(Image.open(f).height for f in files[:2])
        assert mosaic.width == scale * sum(Image.open(f).width for f in files[:2]) + make_docs_figures.GAP
        # the box is drawn, enlarged, where the detection says
        tile = np.asarray(mosaic.convert("RGB"), np.int16)[:, :first.width * scale]
        plain = np.asarray(first.convert("RGB").resize((first.width * scale, first.height * scale)), np.int16)
        x1, y1, x2, y2 = (round(v * scale) for v in BOX)
        assert np.abs(tile[(y1 + y2) // 2, x1] - plain[(y1 + y2) // 2, x1]).max() > 60


def test_asks_for_the_demo_first(tmp_path):
    run = write_run(tmp_path, "run", epochs=2, scale=1.0)
    with pytest.raises(SystemExit, match="demo"):
        make_docs_figures.main(["--run", str(run), "--out", str(tmp_path / "docs")])


def _convergence_run(work, name, ap50s):
    run = work / name
    run.mkdir(parents=True)
    lines = [{"epoch": e, "n_parameters": 1_000_000 + len(name),
              "test_coco_eval_bbox": [v / 2, v, v / 3] + [0.0] * 9} for e, v in enumerate(ap50s)]
    (run / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "wall_seconds.txt").write_text("90\n")


def test_convergence_figure_and_table_from_complete_runs(tmp_path, monkeypatch):
    """Complete runs are read, not trained: the figure and the table come from their logs."""
    from tools import convergence
    monkeypatch.setattr(convergence, "train", lambda *a: pytest.fail("a complete run was trained again"))
    epochs = convergence.epochs_of(convergence.COMMON_FLAGS)
    work, data = tmp_path / "runs", tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    for i, model in enumerate(convergence.SETS["comparison"]):
        _convergence_run(work, model.name, [0.1 * (i + 1) * (e + 1) / epochs for e in range(epochs)])
    rows = convergence.main(["--set", "comparison", "--data", str(data), "--work", str(work),
                             "--out", str(tmp_path / "docs")])["comparison"]
    png, table = tmp_path / "docs" / "convergence.png", (tmp_path / "docs" / "convergence.md").read_text()
    assert 0 < png.stat().st_size < MAX_BYTES
    assert [r["model"].name for r in rows] == ["sam_detr", "sam_detr_smca", "no_sam", "detr"]
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and lines[2].startswith("| SAM-DETR | `(none)` |")
    assert "| `--meta_arch detr` |" in lines[-1]
    # AP50 per epoch in percent, then the last epoch's AP and AP75, then minutes
    assert lines[-1].rstrip(" |").split(" | ")[-3 - epochs:] == (
        [f"{40 * (e + 1) / epochs:.1f}" for e in range(epochs)] + ["20.0", "13.3", "1.5"])


def test_convergence_trains_what_is_missing_with_one_setting(tmp_path, monkeypatch):
    from tools import convergence
    trained = []

    def fake_train(model, data, run_dir, threads=None):
        trained.append((model.name, threads))
        _convergence_run(run_dir.parent, model.name, [0.2] * convergence.epochs_of(convergence.COMMON_FLAGS))
    monkeypatch.setattr(convergence, "train", fake_train)
    (tmp_path / "data" / "annotations").mkdir(parents=True)
    convergence.main(["--set", "all", "--data", str(tmp_path / "data"), "--work", str(tmp_path / "runs"),
                      "--out", str(tmp_path / "docs"), "--jobs", "2"])
    names = [name for name, _ in trained]
    # every model once: the ablations reuse the comparison's SAM-DETR and no-SAM runs
    assert sorted(names) == sorted({m.name for models in convergence.SETS.values() for m in models})
    assert set(threads for _, threads in trained) == {max(1, (os.cpu_count() or 1) // 2)}
    assert (tmp_path / "docs" / "ablations.png").exists()


def test_finetune_demo_trains_both_arms_on_the_second_task_then_reads_them(tmp_path, monkeypatch):
    """Every arm and seed runs the same command on the second task, the fine-tuned arm with --finetune;
    the figure and the table (mean ± spread over seeds) come from the logs."""
    from tools import finetune_demo
    calls = []

    def fake_train(model, data, run_dir, threads=None, common_flags=(), num_classes=0):
        calls.append((model.name, list(model.flags), list(common_flags), num_classes))
        seed = int(common_flags[list(common_flags).index("--seed") + 1])
        base = 0.4 if model.name == "finetuned" else 0.1
        _convergence_run(run_dir.parent, run_dir.name, [base + 0.01 * (seed - 42) + 0.05 * e
                                                        for e in range(finetune_demo.EPOCHS)])
    monkeypatch.setattr(finetune_demo, "train", fake_train)
    source = tmp_path / "source.pth"
    source.write_bytes(b"")
    data = tmp_path / "shapes2"
    finetune_demo.main(["--source", str(source), "--data", str(data), "--work", str(tmp_path / "runs"),
                        "--out", str(tmp_path / "docs")])
    categories = json.loads((data / "annotations" / "instances_train2017.json").read_text())["categories"]
    assert [c["name"] for c in categories] == list(finetune_demo.SECOND_CLASSES)
    assert len(calls) == 2 * len(finetune_demo.SEEDS)
    assert {tuple(flags) for _, flags, _, _ in calls} == {("--finetune", str(source)), ()}
    by_arm = {name: [c for c in calls if c[0] == name] for name in ("finetuned", "scratch")}
    assert [c[2] for c in by_arm["finetuned"]] == [c[2] for c in by_arm["scratch"]]  # the same budget
    table = (tmp_path / "docs" / "finetune.md").read_text().splitlines()
    # seeds 42, 43, 44 at epoch 1: 40, 41, 42 -> 41.0 ± 1.0
    assert table[2].startswith("| fine-tuned") and "| 41.0 ± 1.0 |" in table[2]
    assert 0 < (tmp_path / "docs" / "finetune.png").stat().st_size < MAX_BYTES
    calls.clear()
    finetune_demo.main(["--source", str(source), "--data", str(data), "--work", str(tmp_path / "runs"),
                        "--out", str(tmp_path / "docs")])
    assert not calls  # complete runs are read


def test_second_task_draws_other_shapes_with_ids_in_order(tmp_path):
    make_synthetic_coco(out_dir=tmp_path, num_train=6, num_val=0, image_size=96, seed=0,
                        classes=("ring", "cross", "square"))
    data = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "ring"), (2, "cross"), (3, "square")]
    assert {a["category_id"] for a in data["annotations"]} <= {1, 2, 3}
    with pytest.raises(ValueError, match="distinct shapes"):
        make_synthetic_coco(out_dir=tmp_path / "bad", num_train=1, num_val=0, image_size=96, seed=0,
                            classes=("ring", "hexagon"))
