"""An ablation variant through the pipeline: its switches are stored in the checkpoint, and
`--eval --resume`, demo.py and the ONNX exporter rebuild it without flags; a checkpoint of another
variant names the switch to fix. And COCO test-dev: `main.py --test` writes the evaluation
server's results file, gathered over processes under torchrun."""
import json
import shutil

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import demo
from e2e import TINY, run_main
from engine import COCO_MAX_DETECTIONS
from models.export import OnnxRuntimeDetector
from test_train_eval import _torchrun, coco_dir  # noqa: F401 (a fixture)
from tools import export_onnx as export_tool

VARIANT = ("--sam_points", "2", "--no_sam_reweight", "--sam_search", "image")
STORED = {"sam_points": 2, "no_sam_reweight": True, "sam_search": "image", "no_sam": False, "sam_resample": "salient"}
ONNX_TOLERANCE = 1e-4  # tools/export_onnx.py's default --tolerance
QUERIES, NUM_CLASSES = 20, 4  # TINY's --num_queries and --num_classes
RESULTS = "detections_test-dev2017_samdetr_results.json"


@pytest.fixture(scope="module")
def variant_run(coco_dir, module_tmp):
    out = module_tmp("variant")
    run_main("--coco_path", coco_dir, "--epochs", "1", "--output_dir", out, *VARIANT)
    return out


def _logged(run_dir):
    return [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]


def test_the_checkpoint_stores_the_switches(variant_run):
    args = torch.load(variant_run / "checkpoint.pth", weights_only=True)["args"]
    assert {k: args[k] for k in STORED} == STORED


def test_eval_resume_rebuilds_the_variant_without_flags(variant_run, coco_dir, capsys):
    stats = run_main("--coco_path", coco_dir, "--epochs", "1", "--eval", "--resume", variant_run / "checkpoint.pth")
    taken = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model flags from the"))
    assert "--sam_points=2" in taken and "--sam_search=image" in taken
    (log,) = _logged(variant_run)
    assert stats["coco_eval_bbox"] == pytest.approx(log["test_coco_eval_bbox"], abs=1e-6)
    assert stats["loss"] == pytest.approx(log["test_loss"], rel=1e-5)


def test_a_given_switch_is_given_whatever_its_value(variant_run, coco_dir):
    """"Given" means on the command line: one switch given leaves the others to the checkpoint (a
    --sam_points given does not make the image search of the checkpoint a box search), and an
    explicit value equal to the default still wins over the checkpoint."""
    (log,) = _logged(variant_run)
    same = run_main("--coco_path", coco_dir, "--epochs", "1", "--eval", "--resume", variant_run / "checkpoint.pth",
                    "--sam_points", "2")
    assert same["loss"] == pytest.approx(log["test_loss"], rel=1e-5)
    box = run_main("--coco_path", coco_dir, "--epochs", "1", "--eval", "--resume", variant_run / "checkpoint.pth",
                   "--sam_search", "box")
    assert box["loss"] != pytest.approx(log["test_loss"], rel=1e-5)


def test_a_conflicting_switch_names_the_fix(variant_run, coco_dir):
    # the checkpoint's other switches are taken (not given): the message says where they came from
    with pytest.raises(SystemExit, match=r"--no_sam removes.*taken from the checkpoint.*--sam_points=2"):
        run_main("--coco_path", coco_dir, "--epochs", "1", "--eval", "--resume", variant_run / "checkpoint.pth", "--no_sam")



def test_demo_rebuilds_the_variant(variant_run, coco_dir, tmp_path):
    records = demo.main(["--resume", str(variant_run / "checkpoint.pth"), "--device", "cpu", "--images",
                         str(coco_dir / "val2017"), "--output_dir", str(tmp_path), "--threshold", "0"])
    # (a model built without the switches would not load the weights: CheckpointMismatchError)
    assert len(records) == 4
    assert all(len(r["detections"]) == QUERIES * (NUM_CLASSES) for r in records)  # every (query, class) pair


def test_exporter_rebuilds_the_variant(variant_run, tmp_path):
    path = tmp_path / "variant.onnx"
    diffs = export_tool.main(["--resume", str(variant_run / "checkpoint.pth"), "--output", str(path)])
    assert max(diffs["pred_logits"], diffs["pred_boxes"]) <= ONNX_TOLERANCE
    assert OnnxRuntimeDetector(path).metadata["sam_points"] == 2


# ------------------------------------------------------------------------------------------
# COCO test-dev
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_dev(coco_dir, module_tmp):
    """A test-dev layout of the validation images: test2017/ and an image-info json (images and
    categories, no annotations), beside the val annotations to score the results with."""
    root = module_tmp("testdev")
    shutil.copytree(coco_dir / "val2017", root / "test2017")
    (root / "annotations").mkdir()
    info = json.loads((coco_dir / "annotations" / "instances_val2017.json").read_text())
    info.pop("annotations")
    (root / "annotations" / "image_info_test-dev2017.json").write_text(json.dumps(info))
    return root


def test_test_dev_results_file_scores_as_the_evaluation(variant_run, coco_dir, test_dev, tmp_path):
    ckpt = variant_run / "checkpoint.pth"
    path = run_main("--coco_path", test_dev, "--epochs", "1", "--test", "--resume", ckpt, "--output_dir", tmp_path)
    assert path == tmp_path / RESULTS and not list(tmp_path.glob("*.partial"))
    results = json.loads(path.read_text())
    assert {"image_id", "category_id", "bbox", "score"} == set(results[0])
    gt = COCO(str(coco_dir / "annotations" / "instances_val2017.json"))
    per_image = {}
    for r in results:
        per_image.setdefault(r["image_id"], []).append(r)
    assert sorted(per_image) == sorted(gt.getImgIds())
    for image_id, entries in per_image.items():
        assert len(entries) == min(COCO_MAX_DETECTIONS, QUERIES * NUM_CLASSES)  # all (query, class) pairs here
        assert [e["score"] for e in entries] == sorted((e["score"] for e in entries), reverse=True)
        assert all(e["bbox"][2] >= 0 and e["bbox"][3] >= 0 for e in entries)  # [x, y, w, h], not xyxy
    # the file, scored against the annotations, gives the AP that --eval computes on the same images
    evaluation = COCOeval(gt, gt.loadRes(str(path)), "bbox")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    (log,) = _logged(variant_run)
    assert evaluation.stats.tolist() == pytest.approx(log["test_coco_eval_bbox"], abs=2e-4)


def test_test_dev_names_what_is_missing(variant_run, coco_dir, tmp_path):
    with pytest.raises(SystemExit, match="test2017"):
        run_main("--coco_path", coco_dir, "--epochs", "1", "--test", "--resume", variant_run / "checkpoint.pth",
                 "--output_dir", tmp_path)
    with pytest.raises(SystemExit, match="--output_dir"):
        run_main("--coco_path", coco_dir, "--test", "--resume", variant_run / "checkpoint.pth")
    with pytest.raises(SystemExit, match="--resume"):
        run_main("--coco_path", coco_dir, "--test", "--output_dir", tmp_path)


@pytest.mark.slow
def test_torchrun_gathers_test_dev_results_from_both_processes(variant_run, test_dev, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # one image per batch: a batch's padding depends on which images share it, which differs here
    common = ["--batch_size", "1", "--coco_path", test_dev, "--epochs", "1", "--test", "--resume", variant_run / "checkpoint.pth", "--test_name", "x"]
    run_main(*common, "--output_dir", one)
    _torchrun("main.py", *TINY, *common, "--output_dir", two)
    name = "detections_test-dev2017_x_results.json"
    single, gathered = json.loads((one / name).read_text()), json.loads((two / name).read_text())
    assert len(gathered) == len(single)
    for a, b in zip(single, gathered):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.05)
