"""The original DETR (--meta_arch detr) through the whole pipeline, on the CPU with generated
COCO-format data and e2e.py's reduced model: train, checkpoint, log, evaluate, resume, the flags it
refuses, checkpoints of the other architecture, demo.py, the ONNX exporter, --amp and torchrun.
"""
import json
import shutil

import pytest
import torch

import demo
from datasets.coco import load_image
from datasets.transforms import make_coco_transforms
from e2e import TINY, run_main
from main import get_args_parser
from models import CheckpointMismatchError, DETRPostProcess, build_model, load_weights
from models.detr import NO_OBJECT_LOGITS
from models.export import OnnxRuntimeDetector
from test_train_eval import OFFICIAL_LOG_KEYS, _torchrun, coco_dir  # noqa: F401 (a fixture)
from tools import export_onnx as export_tool
from tools import plot_logs
from util.checkpoint import args_from_checkpoint

DETR = ("--meta_arch", "detr")
NUM_CLASSES = 4         # TINY's --num_classes: the synthetic shapes' ids 1..3, + 1
NUM_QUERIES = 20        # TINY's --num_queries
CLASS_NAMES = {1: "circle", 2: "square", 3: "triangle"}
ONNX_TOLERANCE = 1e-4   # tools/export_onnx.py's default --tolerance
SCORE_TOLERANCE = 1e-5  # demo.py's scores against the same model called directly


def run_detr(*flags):
    """main.main() with TINY, --meta_arch detr and `flags`; returns its stats."""
    return run_main(*DETR, *flags)


@pytest.fixture(scope="module")
def one_epoch(coco_dir, module_tmp):
    """The output folder of one epoch of DETR training (checkpoint, log.txt, eval/)."""
    out = module_tmp("detr_run")
    run_detr("--coco_path", coco_dir, "--epochs", "1", "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def checkpoint(one_epoch):
    return torch.load(one_epoch / "checkpoint.pth", weights_only=True)


def _logged(run_dir):
    return [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]


def test_one_epoch_writes_checkpoint_and_official_log(one_epoch, checkpoint, tmp_path):
    assert (one_epoch / "checkpoint0000.pth").exists() and (one_epoch / "eval" / "latest.pth").exists()
    (log,) = _logged(one_epoch)
    assert OFFICIAL_LOG_KEYS <= set(log) and log["epoch"] == 0 and len(log["test_coco_eval_bbox"]) == 12
    assert checkpoint["epoch"] == 0 and checkpoint["class_names"] == CLASS_NAMES
    # the flags demo.py and the exporter rebuild the model from: DETR's, with its defaults filled in
    stored = checkpoint["args"]
    assert (stored["meta_arch"], stored["num_queries"], stored["eos_coef"]) == ("detr", NUM_QUERIES, 0.1)
    assert (stored["set_cost_class"], stored["cls_loss_coef"], stored["focal_alpha"]) == (1.0, 1.0, None)
    # the logs of DETR runs plot as SAM-DETR's do (same keys)
    assert plot_logs.main([str(one_epoch), "--out", str(tmp_path / "curves.png")]).stat().st_size > 0


def test_custom_num_classes_gives_a_class_head_with_no_object(checkpoint):
    """--num_classes 4: four real-class logits and "no object", in one class head of every layer."""
    state = checkpoint["model"]
    assert state["class_embed.weight"].shape[0] == NUM_CLASSES + NO_OBJECT_LOGITS
    assert state["class_embed.bias"].shape == (NUM_CLASSES + NO_OBJECT_LOGITS,)
    assert not any(key.startswith("class_embed.0.") for key in state)  # SAM-DETR's per-layer heads


def test_eval_resume_reproduces_the_logged_ap_and_loss(one_epoch, coco_dir):
    stats = run_detr("--coco_path", coco_dir, "--epochs", "1", "--eval", "--resume", one_epoch / "checkpoint.pth")
    (log,) = _logged(one_epoch)
    assert stats["coco_eval_bbox"] == pytest.approx(log["test_coco_eval_bbox"], abs=1e-6)
    assert stats["loss"] == pytest.approx(log["test_loss"], rel=1e-5)
    assert stats["loss_ce"] == pytest.approx(log["test_loss_ce"], rel=1e-5)


def test_amp_fp16_on_cpu_runs_float32_with_a_note(one_epoch, coco_dir, capsys):
    stats = run_detr("--coco_path", coco_dir, "--epochs", "1", "--eval", "--resume", one_epoch / "checkpoint.pth",
                     "--amp", "fp16")
    assert "--amp fp16 applies on CUDA (and bf16 on the CPU); running in float32 on cpu" in capsys.readouterr().out
    (log,) = _logged(one_epoch)
    assert stats["loss"] == pytest.approx(log["test_loss"], rel=1e-5)


def test_auto_resume_continues_the_run(one_epoch, coco_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    run_detr("--coco_path", coco_dir, "--epochs", "2", "--output_dir", run, "--auto_resume")
    assert [entry["epoch"] for entry in _logged(run)] == [0, 1]
    assert torch.load(run / "checkpoint.pth", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("flags", [["--smca"], ["--multiscale"], ["--roi_align", "kernel"],
                                   ["--smca", "--multiscale", "--roi_align", "kernel"]])
def test_sam_detr_flags_are_refused_by_name(flags, coco_dir):
    with pytest.raises(SystemExit) as error:
        run_detr("--coco_path", coco_dir, *flags)
    message = str(error.value)
    assert "--meta_arch detr" in message
    for flag in flags:
        if flag.startswith("--"):
            assert flag in message, message


def test_detr_checkpoint_into_sam_detr_names_meta_arch_detr(one_epoch, coco_dir):
    # --meta_arch sam_detr given: it wins over the checkpoint's detr, and the weights do not fit
    with pytest.raises(CheckpointMismatchError, match="--meta_arch detr"):
        run_main("--coco_path", coco_dir, "--epochs", "1", "--eval", "--resume", one_epoch / "checkpoint.pth",
                 "--meta_arch", "sam_detr")
    # not given, it is the checkpoint's: DETR is rebuilt
    stats = run_main("--coco_path", coco_dir, "--epochs", "1", "--eval", "--resume", one_epoch / "checkpoint.pth")
    assert len(stats["coco_eval_bbox"]) == 12


def test_sam_detr_checkpoint_into_detr_names_meta_arch_sam_detr():
    sam_detr, _, _ = build_model(get_args_parser().parse_args(TINY))
    detr, _, _ = build_model(get_args_parser().parse_args(TINY + list(DETR)))
    with pytest.raises(CheckpointMismatchError, match="--meta_arch sam_detr"):
        load_weights(detr, sam_detr.state_dict(), "sam_detr.pth")


def _direct_detections(checkpoint, image_path):
    """DETRPostProcess's scores of one image, by the model of the checkpoint's flags, best first."""
    args = get_args_parser().parse_args(TINY + list(DETR))
    model, _, _ = build_model(args)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    image = load_image(image_path)
    tensor, _ = make_coco_transforms("val", max_size=args.max_size, val_size=args.val_size)(image, None)
    with torch.inference_mode():
        result = DETRPostProcess()(model([tensor]), torch.tensor([[image.height, image.width]]))[0]
    return result["scores"].sort(descending=True).values


def test_demo_rebuilds_detr_from_the_checkpoint(one_epoch, checkpoint, coco_dir, tmp_path):
    """No model flags: DETR, its post-processor (one detection per query) and the class names
    come from the checkpoint; detections are best first; the threshold keeps score >= it."""
    common = ["--resume", str(one_epoch / "checkpoint.pth"), "--device", "cpu"]
    records = demo.main(common + ["--images", str(coco_dir / "val2017"), "--output_dir", str(tmp_path / "all"),
                                  "--threshold", "0"])
    assert len(records) == 4
    for record in records:
        detections = record["detections"]
        assert len(detections) == NUM_QUERIES  # every query once, with its best real class
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
        for det in detections:
            assert 0 <= det["label"] < NUM_CLASSES  # never "no object"
            assert det["name"] == CLASS_NAMES.get(det["label"], f"class {det['label']}")
    first = records[0]
    expected = _direct_detections(checkpoint, first["image"])
    assert [d["score"] for d in first["detections"]] == pytest.approx(expected.tolist(), abs=SCORE_TOLERANCE)
    threshold = first["detections"][NUM_QUERIES // 2]["score"]
    kept = demo.main(common + ["--images", first["image"], "--output_dir", str(tmp_path / "kept"),
                               "--threshold", str(threshold)])
    assert kept[0]["detections"] == [d for d in first["detections"] if d["score"] >= threshold]


def test_exporter_rebuilds_detr_from_the_checkpoint(one_epoch, tmp_path):
    path = tmp_path / "detr.onnx"
    # no model flags; the tool stops by itself when onnxruntime differs from PyTorch by > tolerance
    diffs = export_tool.main(["--resume", str(one_epoch / "checkpoint.pth"), "--output", str(path)])
    assert max(diffs["pred_logits"], diffs["pred_boxes"]) <= ONNX_TOLERANCE
    detector = OnnxRuntimeDetector(path)
    assert detector.metadata["meta_arch"] == "detr" and detector.metadata["num_queries"] == NUM_QUERIES
    assert detector.logits_per_query == NUM_CLASSES + NO_OBJECT_LOGITS
    assert detector.class_names == CLASS_NAMES


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_a_detr_epoch(coco_dir, tmp_path):
    done = _torchrun("main.py", *TINY, *DETR, "--coco_path", coco_dir, "--epochs", "1", "--output_dir", tmp_path)
    assert "gloo" in done.stdout + done.stderr
    (log,) = _logged(tmp_path)
    assert OFFICIAL_LOG_KEYS <= set(log)
    assert args_from_checkpoint(torch.load(tmp_path / "checkpoint.pth", weights_only=True))["meta_arch"] == "detr"
