"""tools/make_docs_figures.py: the README's pictures from a run's log and demo output."""
import json
import os
import sys
import types

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


def _benchmark_inputs(tmp_path):
    """The data and backbone folders the benchmark would make, present so that nothing is made."""
    data, backbone = tmp_path / "data", tmp_path / "backbone.pth"
    (data / "annotations").mkdir(parents=True)
    backbone.write_bytes(b"")
    return ["--data", str(data), "--backbone_weights", str(backbone)]


# final AP50 per seed 42, 43, 44 (each run rises linearly to it)
FINAL_AP50 = {"sam_detr": (0.30, 0.34, 0.32), "sam_detr_smca": (0.40, 0.44, 0.42), "no_sam": (0.33, 0.20, 0.25),
              "detr": (0.05, 0.06, 0.07), "sam_search_image": (0.50, 0.52, 0.51)}


def test_convergence_reads_complete_runs_into_bands_tables_and_verdicts(tmp_path, monkeypatch):
    """Complete runs are read, not trained: figures, tables with mean ± deviation over seeds, and the
    paper's claims judged only where every seed of one model ends above every seed of the other."""
    from tools import convergence
    monkeypatch.setattr(convergence, "train", lambda *a, **k: pytest.fail("a complete run was trained again"))
    epochs = convergence.epochs_of(convergence.SETTINGS["benchmark"].flags)
    work = tmp_path / "runs" / "benchmark"
    models = {m.name for models in convergence.SETS.values() for m in models}
    for name in models:
        for seed, last in zip(convergence.SEEDS, FINAL_AP50.get(name, (0.31, 0.33, 0.35))):
            _convergence_run(work, f"{name}_seed{seed}", [last * (e + 1) / epochs for e in range(epochs)])
    written = convergence.main(["--set", "all", *_benchmark_inputs(tmp_path), "--work", str(tmp_path / "runs"),
                                "--out", str(tmp_path / "docs")])
    for stem in ("convergence", "ablations"):
        assert 0 < (tmp_path / "docs" / f"{stem}.png").stat().st_size < MAX_BYTES
    lines = (tmp_path / "docs" / "convergence.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:6]] == [
        "| SAM-DETR", "| SAM-DETR w/ SMCA", "| no Semantics Aligner (`--no_sam`)", "| DETR (`--meta_arch detr`)"]
    cells = lines[2].strip("| ").split(" | ")
    assert cells[1:3] == ["`(none)`", "1.00 M"]
    # AP50 per epoch: SAM-DETR's seeds end at 30, 34, 32 -> 32.0 ± 2.0; the first epoch a quarter of that
    assert cells[3:3 + epochs] == [f"{32 * (e + 1) / epochs:.1f} ± {2 * (e + 1) / epochs:.1f}" for e in range(epochs)]
    assert cells[3 + epochs + 2:] == ["30.0, 34.0, 32.0", "1.5"]  # the last AP50 of each seed, minutes
    assert "mean ± standard deviation over seeds 42, 43, 44" in written["comparison"]
    claims = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ") for line in
              (tmp_path / "docs" / "claims.md").read_text().splitlines()[2:] if line.startswith("| ")}
    assert len(claims) == len(convergence.CLAIMS)
    assert claims["DETR is far behind at the same short budget"][3] == "agrees"
    assert claims["SMCA adds to SAM-DETR"][3] == "agrees"
    assert claims["the Semantics Aligner lifts the baseline"][3] == "cannot tell"  # 20-33 overlaps 30-34
    assert claims["salient points inside the box beat points over the image"][3] == "disagrees"
    assert claims["SMCA adds to SAM-DETR"][2] == "42.0 ± 2.0 vs 32.0 ± 2.0"
    # after each epoch: SAM-DETR's e1 values (7.5, 8.5, 8) against no-SAM's (8.25, 5, 6.25) overlap, as do all
    assert claims["the Semantics Aligner lifts the baseline"][-1] == " ".join(["?"] * epochs)
    assert claims["DETR is far behind at the same short budget"][-1] == " ".join(["+"] * epochs)


def test_convergence_trains_each_missing_run_once_with_one_command_line(tmp_path, monkeypatch):
    from tools import convergence
    trained = []

    def fake_train(model, data, run_dir, threads=None, common_flags=(), num_classes=0):
        trained.append((run_dir.name, threads, list(common_flags), list(model.flags)))
        _convergence_run(run_dir.parent, run_dir.name, [0.2] * convergence.epochs_of(common_flags))
    monkeypatch.setattr(convergence, "train", fake_train)
    inputs = _benchmark_inputs(tmp_path)
    convergence.main(["--set", "all", *inputs, "--work", str(tmp_path / "runs"), "--out", str(tmp_path / "docs"),
                      "--jobs", "2", "--seeds", "1", "2"])
    # every model and seed once: the ablations reuse the comparison's SAM-DETR and no-SAM runs
    models = {m.name for name in ("comparison", "ablations") for m in convergence.SETS[name]}
    assert sorted(name for name, *_ in trained) == sorted(f"{m}_seed{s}" for m in models for s in (1, 2))
    assert {threads for _, threads, *_ in trained} == {max(1, (os.cpu_count() or 1) // 2)}
    # one command line: only the seed and the model's own flags differ; the backbone is the one given
    common = {tuple(flags[:-2]) for _, _, flags, _ in trained}
    assert len(common) == 1 and {tuple(flags[-2:]) for _, _, flags, _ in trained} == {("--seed", "1"), ("--seed", "2")}
    flags = list(common.pop())
    assert flags[flags.index("--backbone_weights") + 1] == inputs[-1] and "--no_pretrained_backbone" not in flags
    assert (tmp_path / "docs" / "ablations.png").exists() and (tmp_path / "docs" / "claims.md").exists()
    trained.clear()
    convergence.main(["--set", "aligner", "--setting", "random_backbone", *inputs, "--work", str(tmp_path / "runs"),
                      "--out", str(tmp_path / "docs"), "--seeds", "1"])
    assert sorted(name for name, *_ in trained) == ["no_sam_seed1", "sam_detr_seed1"]
    assert "--no_pretrained_backbone" in trained[0][2] and "--backbone_weights" not in trained[0][2]
    assert (tmp_path / "docs" / "random_backbone_aligner.md").exists()
    assert (tmp_path / "runs" / "random_backbone" / "sam_detr_seed1" / "log.txt").exists()


def test_convergence_makes_a_missing_backbone_with_pretrain_backbone(tmp_path, monkeypatch):
    from tools import convergence
    made = []
    monkeypatch.setitem(sys.modules, "pretrain_backbone", types.SimpleNamespace(main=made.append))
    (tmp_path / "data" / "annotations").mkdir(parents=True)
    args = convergence.parse_args(["--data", str(tmp_path / "data"), "--backbone_weights", str(tmp_path / "b.pth")])
    flags = convergence.prepare(convergence.SETTINGS["benchmark"], args)
    assert made == [["--out", str(tmp_path / "b.pth")]]
    assert flags[flags.index("--backbone_weights") + 1] == str(tmp_path / "b.pth")


@pytest.mark.parametrize("better, worse, expected", [
    ((0.3, 0.4), (0.1, 0.29), "agrees"), ((0.3, 0.4), (0.1, 0.3), "cannot tell"),
    ((0.1, 0.2), (0.25, 0.3), "disagrees"), ((0.1, 0.5), (0.2, 0.3), "cannot tell")])
def test_a_verdict_needs_ranges_that_do_not_overlap(better, worse, expected):
    from tools import seeded_runs
    assert seeded_runs.verdict(better, worse) == expected


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
