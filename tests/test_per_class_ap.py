"""AP per category: equal to pycocotools' own AP of that category alone, a compact table, stored in
log.txt (test_per_class) and eval dumps, and plotted by tools/plot_logs.py --classes."""
import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

import test_train_eval
from datasets.coco_eval import (COLUMN_SEPARATOR, NO_AP, NAME_WIDTH, CocoEvaluator, object_counts, per_class_ap,
                                 per_class_table, predictions_to_coco)
from e2e import run_main
from test_coco_eval import noisy_predictions, quiet_coco, random_box
from test_plot_logs import PNG_SIGNATURE, fake_entry
from tools import plot_logs

NUM_IMAGES = 30
IMAGE_W, IMAGE_H = 640, 480
MAX_OBJECTS = 5
CROWD_PROB = 0.1
BATCH = 5
SHIFT = 0.3  # at most this fraction of a box's size: IoUs spread over the thresholds, so AP50 differs from AP55
NAMES = {1: "person", 2: "traffic light", 3: "car", 4: "unicorn"}
NO_OBJECTS = 4  # a category without annotations, but detected (a false positive)
ONLY_CROWD = 5  # a category whose only annotation is a crowd region: no objects either
COCO_CATEGORIES = 80
COCO_TABLE_LINES = 2 + math.ceil(COCO_CATEGORIES / 3)  # title, header, 3 categories per line
MAX_LINE_CHARS = 120
SYNTHETIC_NAMES = {"1": "circle", "2": "square", "3": "triangle"}  # datasets/synthetic.py's categories

coco_dir = test_train_eval.coco_dir  # the generated data of the end-to-end tests (a fixture)


@pytest.fixture(scope="module")
def ground_truth():
    """Random boxes of categories 1-3 (a few crowd), none of 4, one crowd region of ONLY_CROWD."""
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": IMAGE_W, "height": IMAGE_H}
              for i in range(1, NUM_IMAGES + 1)]
    annotations = []
    for image in images:
        for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
            box = random_box(rng)
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "bbox": box,
                                "category_id": int(rng.integers(1, 4)), "area": box[2] * box[3],
                                "iscrowd": int(rng.uniform() < CROWD_PROB)})
    box = random_box(rng)
    annotations.append({"id": len(annotations) + 1, "image_id": 1, "bbox": box, "category_id": ONLY_CROWD,
                        "area": box[2] * box[3], "iscrowd": 1})
    categories = [{"id": c, "name": n, "supercategory": "x"} for c, n in {**NAMES, ONLY_CROWD: "crowd"}.items()]
    return quiet_coco({"images": images, "annotations": annotations, "categories": categories})


@pytest.fixture(scope="module")
def evaluated(ground_truth):
    """A CocoEvaluator fed noisy detections (labels 1-3, and one of NO_OBJECTS) batch by batch, then
    accumulated; -> (evaluator, the detections as a COCO results list)."""
    evaluator = CocoEvaluator(ground_truth)
    predictions = noisy_predictions(ground_truth)
    rng = np.random.default_rng(2)
    for prediction in predictions.values():
        boxes = prediction["boxes"]
        size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        prediction["boxes"] = boxes + torch.from_numpy(rng.uniform(-SHIFT, SHIFT, tuple(boxes.shape))).float() * size
    first = predictions[1]
    predictions[1] = {"boxes": torch.cat([first["boxes"], torch.tensor([[1.0, 1.0, 21.0, 21.0]])]),
                      "scores": torch.cat([first["scores"], torch.tensor([0.9])]),
                      "labels": torch.cat([first["labels"], torch.tensor([NO_OBJECTS])])}
    ids = sorted(predictions)
    for start in range(0, len(ids), BATCH):
        evaluator.update({i: predictions[i] for i in ids[start:start + BATCH]})
    evaluator.synchronize_between_processes()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
    return evaluator, predictions_to_coco(predictions)


def single_category_stats(coco_gt, detections, category: int) -> np.ndarray:
    """pycocotools' own 12 stats with the evaluation restricted to one category."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(detections)), iouType="bbox")
        coco_eval.params.catIds = [category]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def test_per_class_ap_equals_pycocotools_one_category_at_a_time(ground_truth, evaluated):
    evaluator, detections = evaluated
    per_class = per_class_ap(evaluator.coco_eval["bbox"])
    assert sorted(per_class) == [1, 2, 3, NO_OBJECTS, ONLY_CROWD]
    for category in (1, 2, 3):
        stats = single_category_stats(ground_truth, detections, category)
        row = per_class[category]
        assert 0 < row["AP"] < 1  # noisy detections: neither nothing nor everything found
        assert row["AP"] == pytest.approx(stats[0], abs=1e-12)
        assert row["AP50"] == pytest.approx(stats[1], abs=1e-12)
        assert row["name"] == NAMES[category]
        expected = sum(1 for a in ground_truth.dataset["annotations"]
                       if a["category_id"] == category and not a["iscrowd"])
        assert row["objects"] == expected > 0
    for category in (NO_OBJECTS, ONLY_CROWD):  # detected or not, a category without objects has no AP
        assert per_class[category]["objects"] == 0
        assert per_class[category]["AP"] is None and per_class[category]["AP50"] is None
    # COCO's AP is the mean over the categories with objects
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    aps = [row["AP"] for row in per_class.values() if row["AP"] is not None]
    assert np.mean(aps) == pytest.approx(evaluator.coco_eval["bbox"].stats[0], abs=1e-12)
    assert json.loads(json.dumps(per_class)) == {str(k): v for k, v in per_class.items()}  # plain values


def test_objects_are_counted_in_the_evaluated_images_only(ground_truth):
    first = [1, 2]
    evaluator = CocoEvaluator(ground_truth)
    evaluator.update({i: prediction for i, prediction in noisy_predictions(ground_truth).items() if i in first})
    evaluator.synchronize_between_processes()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
    counts = {k: row["objects"] for k, row in per_class_ap(evaluator.coco_eval["bbox"]).items()}
    assert counts == object_counts(ground_truth, first)
    assert counts[NO_OBJECTS] == 0 and counts[ONLY_CROWD] == 0
    assert sum(counts.values()) == sum(1 for a in ground_truth.dataset["annotations"]
                                       if a["image_id"] in first and not a["iscrowd"]) > 0


def test_nothing_evaluated_gives_no_rows(ground_truth):
    evaluator = CocoEvaluator(ground_truth)
    evaluator.synchronize_between_processes()
    with pytest.warns(UserWarning, match="no image was evaluated"):
        evaluator.accumulate()
    assert per_class_ap(evaluator.coco_eval["bbox"]) == {}
    assert per_class_table({}) == ""


def coco_like_rows() -> dict:
    """80 categories with COCO's id gaps, long names, counts up to 6 digits, some without objects."""
    ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    assert len(ids) == COCO_CATEGORIES
    rows = {}
    for index, cat_id in enumerate(ids):
        objects = 0 if index % 17 == 0 else 262465 // (index + 1)
        ap = None if objects == 0 else index / COCO_CATEGORIES
        rows[cat_id] = {"name": f"{cat_id} long name of a category", "objects": objects, "AP": ap,
                        "AP50": None if ap is None else min(1.0, 1.5 * ap)}
    return rows


def test_table_for_coco_is_compact():
    rows = coco_like_rows()
    table = per_class_table(rows)
    lines = table.splitlines()
    assert len(lines) <= COCO_TABLE_LINES
    assert max(len(line) for line in lines) <= MAX_LINE_CHARS
    cells = [cell.split() for line in lines[2:] for cell in line.split(COLUMN_SEPARATOR)]
    assert len(cells) == COCO_CATEGORIES
    names = {cell[0]: " ".join(cell[1:-3]) for cell in cells}  # id, rest of the name, objects, AP, AP50
    assert set(names) == {str(k) for k in rows}
    for cat_id, row in rows.items():  # names cut to the column, numbers whole, AP in percent
        assert f"{cat_id} {names[str(cat_id)]}" == row["name"][:NAME_WIDTH].rstrip()
    by_id = {cell[0]: cell[-3:] for cell in cells}
    for cat_id, row in rows.items():
        shown = [str(row["objects"]), NO_AP, NO_AP] if row["AP"] is None else \
            [str(row["objects"]), f"{100 * row['AP']:.1f}", f"{100 * row['AP50']:.1f}"]
        assert by_id[str(cat_id)] == shown
    assert lines[3].startswith("2 long name") and lines[2].startswith("1 long name")  # down, then across


def test_table_of_few_categories_has_as_many_columns_as_needed():
    rows = {1: {"name": "person", "objects": 3, "AP": 0.5, "AP50": 0.75},
            7: {"name": "nothing here", "objects": 0, "AP": None, "AP50": None}}
    lines = per_class_table(rows).splitlines()
    assert len(lines) == 3  # title, header, one line of two categories
    assert lines[1].count("AP50") == 2
    assert lines[2].split() == ["person", "3", "50.0", "75.0", "|", "nothing", "here", "0", NO_AP, NO_AP]


@pytest.fixture(scope="module")
def one_epoch(coco_dir, module_tmp):
    out = module_tmp("per_class_run")
    run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", out)
    return out


def test_training_logs_and_dumps_the_ap_per_class(one_epoch, coco_dir, capsys):
    (line,) = (one_epoch / "log.txt").read_text().splitlines()
    logged = json.loads(line)
    assert "test_coco_eval_bbox" in logged  # the official keys stay
    per_class = logged["test_per_class"]
    assert {k: row["name"] for k, row in per_class.items()} == SYNTHETIC_NAMES
    for row in per_class.values():
        assert row["objects"] >= 0 and (row["AP"] is None) == (row["objects"] == 0)
        assert row["AP"] is None or (0 <= row["AP"] <= 1 and 0 <= row["AP50"] <= 1)
    dumped = torch.load(one_epoch / "eval" / "latest.pth", weights_only=True)["per_class"]
    assert {str(k): v for k, v in dumped.items()} == per_class
    # --eval prints the table after COCO's summary and returns the same rows
    stats = run_main("--coco_path", coco_dir, "--epochs", "1", "--eval", "--resume", one_epoch / "checkpoint.pth")
    printed = capsys.readouterr().out
    assert printed.index("AP per category") > printed.index("maxDets=100 ]")
    assert {str(k) for k in stats["per_class"]} == set(per_class)
    for k, row in stats["per_class"].items():  # the same weights: the AP logged after training
        for stat in ("AP", "AP50"):
            assert row[stat] == per_class[str(k)][stat] or row[stat] == pytest.approx(per_class[str(k)][stat])


def test_detr_logs_the_ap_per_class(coco_dir, tmp_path):
    run_main("--meta_arch", "detr", "--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path)
    (line,) = (tmp_path / "log.txt").read_text().splitlines()
    per_class = json.loads(line)["test_per_class"]
    assert {k: row["name"] for k, row in per_class.items()} == SYNTHETIC_NAMES
    assert set(torch.load(tmp_path / "eval" / "0000.pth", weights_only=True)["per_class"]) == {1, 2, 3}


def test_plot_logs_classes(one_epoch, tmp_path):
    log = plot_logs.read_log(one_epoch)
    with_objects = [row["name"] for row in log[0]["test_per_class"].values() if row["objects"]]
    out = plot_logs.main([str(one_epoch), "--out", str(tmp_path / "classes.png"), "--classes", *with_objects])
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(SystemExit, match="--classes hexagon.*1 circle, 2 square, 3 triangle"):
        plot_logs.main([str(one_epoch), "--out", str(tmp_path / "x.png"), "--classes", "hexagon"])


def test_plot_logs_classes_with_older_lines(tmp_path):
    """Lines written before test_per_class are skipped; a category is found by id or by name."""
    run = tmp_path / "run"
    run.mkdir()
    new = {"1": {"name": "traffic light", "objects": 5, "AP": 0.25, "AP50": 0.5}}
    entries = [fake_entry(0, 1.0), {**fake_entry(1, 1.0), "test_per_class": new}]
    (run / "log.txt").write_text("".join(json.dumps(e) + "\n" for e in entries))
    log = plot_logs.read_log(run)
    for category in ("1", "traffic light", "traffic_light"):
        assert plot_logs.class_series(log, category) == {"AP": ([1.0], [25.0]), "AP50": ([1.0], [50.0])}
    out = plot_logs.main([str(run), "--out", str(tmp_path / "c.png"), "--fields", "AP", "--classes", "traffic_light"])
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert plot_logs.parse_args([str(run), "--out", "x.png"]).fields == list(plot_logs.DEFAULT_FIELDS)
    old_only = tmp_path / "old"
    old_only.mkdir()
    (old_only / "log.txt").write_text(json.dumps(fake_entry(0, 1.0)) + "\n")
    with pytest.raises(SystemExit, match="no per-class AP"):
        plot_logs.main([str(old_only), "--out", str(tmp_path / "x.png"), "--classes", "person"])
    without = {"2": {"name": "car", "objects": 0, "AP": None, "AP50": None}}
    (run / "log.txt").write_text(json.dumps({**fake_entry(0, 1.0), "test_per_class": without}) + "\n")
    with pytest.raises(SystemExit, match="--classes car: .*no objects in the evaluated images"):
        plot_logs.main([str(run), "--out", str(tmp_path / "x.png"), "--classes", "car"])
