"""demo.py end to end on a tiny resnet18 model and synthetic images (CPU, a few seconds)."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, box_iou

import demo
from datasets.synthetic import make_synthetic_coco
from e2e import CallCounter
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, resized_hw
from main import get_args_parser
from util.resume import adopt_model_flags, given_flags
from models import build_model
from util.checkpoint import checkpoint_args_to_dict

NUM_CLASSES = 4  # synthetic shapes: ids 1..3, + 1
NUM_QUERIES = 10
VAL_SIZE, MAX_SIZE = 96, 128
TINY_FLAGS = ["--backbone", "resnet18", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
              "--hidden_dim", "64", "--nheads", "2", "--num_queries", str(NUM_QUERIES),
              "--num_classes", str(NUM_CLASSES), "--no_pretrained_backbone", "--device", "cpu",
              "--val_size", str(VAL_SIZE), "--max_size", str(MAX_SIZE)]
SHAPE_NAMES = {"circle", "square", "triangle"}


def _tiny_args() -> argparse.Namespace:
    return argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(TINY_FLAGS)


@pytest.fixture(scope="module")
def tiny(module_tmp):
    """A checkpoint of a randomly initialised tiny model (flags stored) and 3 synthetic images."""
    root = module_tmp("demo")
    ann = make_synthetic_coco(out_dir=root / "shapes", num_train=0, num_val=3, image_size=80, seed=0)["val"]
    torch.manual_seed(0)
    args = _tiny_args()
    model, _, _ = build_model(args)
    ckpt = root / "tiny.pth"
    torch.save({"model": model.state_dict(), "args": checkpoint_args_to_dict(args)}, ckpt)
    return {"ckpt": ckpt, "images": root / "shapes" / "val2017", "ann": ann, "root": root}


def _run(tiny, out_dir: Path, *extra: str):
    # no model flags: they must come from the checkpoint
    return demo.main(["--resume", str(tiny["ckpt"]), "--images", str(tiny["images"]),
                      "--output_dir", str(out_dir), "--device", "cpu", *extra])


def test_demo_draws_boxes_and_writes_json(tiny, tmp_path):
    records = _run(tiny, tmp_path, "--threshold", "0", "--ann", str(tiny["ann"]))
    inputs = sorted(tiny["images"].glob("*.jpg"))
    assert [Path(r["image"]) for r in records] == inputs
    assert json.loads((tmp_path / "detections.json").read_text()) == records
    for record, source in zip(records, inputs):
        drawn = Path(record["output"])
        assert drawn.parent == tmp_path and drawn.name == f"{source.stem}_det.jpg"
        original, annotated = Image.open(source).convert("RGB"), Image.open(drawn).convert("RGB")
        assert annotated.size == original.size == (record["width"], record["height"])
        changed = np.abs(np.asarray(annotated, np.int16) - np.asarray(original, np.int16)).max(axis=2) > 60
        assert changed.mean() > 0.01, f"no boxes drawn on {drawn}"
        dets = record["detections"]
        # threshold 0 keeps all top-k: queries x classes pairs, at most 100
        assert len(dets) == min(100, NUM_QUERIES * NUM_CLASSES)
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        for det in dets:
            x1, y1, x2, y2 = det["box_xyxy"]
            assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"]
            assert 0 <= det["label"] < NUM_CLASSES
            assert det["name"] in SHAPE_NAMES or det["name"] == f"class {det['label']}"
        # boxes are in original pixels, not normalised units
        assert max(max(d["box_xyxy"]) for d in dets) > 2


def test_boxes_match_direct_inference_in_original_pixels(tiny, tmp_path):
    records = _run(tiny, tmp_path, "--threshold", "0")
    ckpt = torch.load(tiny["ckpt"], weights_only=True)
    model, _, post = build_model(_tiny_args())
    model.load_state_dict(ckpt["model"])
    model.eval()
    record = records[0]
    image = Image.open(record["image"]).convert("RGB")
    # the val pipeline, spelled out: shorter side to val_size, longer <= max_size, ImageNet stats
    size = list(resized_hw(width=image.width, height=image.height, size=VAL_SIZE, max_size=MAX_SIZE))
    tensor = TF.normalize(TF.to_tensor(TF.resize(image, size)), IMAGENET_MEAN, IMAGENET_STD)
    with torch.inference_mode():
        expected = post["bbox"](model([tensor]), torch.tensor([[image.height, image.width]]))[0]
    best = record["detections"][0]
    box = expected["boxes"][0].clamp(min=0).minimum(torch.tensor([image.width, image.height] * 2))
    assert best["label"] == int(expected["labels"][0])
    assert best["score"] == pytest.approx(float(expected["scores"][0]), abs=1e-5)
    assert best["box_xyxy"] == pytest.approx(box.tolist(), abs=1e-3)


def test_threshold_filters_and_names_default_to_class_id(tiny, tmp_path):
    records = _run(tiny, tmp_path, "--threshold", "0.999")
    assert all(d["score"] >= 0.999 for r in records for d in r["detections"])
    everything = _run(tiny, tmp_path / "all", "--threshold", "0")
    assert {d["name"] for r in everything for d in r["detections"]} <= {f"class {i}" for i in range(NUM_CLASSES)}


def test_explicit_flags_win_over_checkpoint_flags():
    parser = demo.build_parser()
    # --epochs 50 equals the default, but it is explicit, so the checkpoint's 12 must not replace it
    argv = ["--resume", "x.pth", "--images", "a.jpg", "--output_dir", "out", "--epochs", "50"]
    args = parser.parse_args(argv)
    stored = {"epochs": 12, "smca": True, "num_queries": 7, "device": "cuda", "output_dir": "elsewhere",
              "resume": "other.pth", "lr": 1.0}
    taken = adopt_model_flags(args, stored, given_flags(parser, argv, args))
    assert taken == {"smca": True, "num_queries": 7}
    assert (args.epochs, args.smca, args.num_queries) == (50, True, 7)
    # run flags and training flags never come from the checkpoint
    assert (args.device, args.output_dir, args.resume, args.lr) == (None, "out", "x.pth", 1e-4)


@pytest.mark.parametrize("override, hint", [
    (["--num_queries", "20"], f"--num_queries {NUM_QUERIES}"),
    (["--epochs", "12"], "--epochs 50"),
    (["--smca"], "no --smca"),
    (["--multiscale"], "no --multiscale"),
    (["--dec_layers", "3"], "--dec_layers 2"),
    (["--backbone", "resnet34"], "--backbone resnet18"),
])
def test_wrong_explicit_flag_gives_a_hint(tiny, tmp_path, override, hint):
    with pytest.raises(SystemExit) as error:
        _run(tiny, tmp_path, *override)
    message = str(error.value)
    assert "does not fit the model" in message and hint in message, message
    assert str(tiny["ckpt"]) in message


def test_checkpoint_with_groupnorm_asks_for_short_epochs(tiny, tmp_path):
    args = _tiny_args()
    args.epochs = 12  # official 12-epoch runs: GroupNorm in input_proj
    model, _, _ = build_model(args)
    state = model.state_dict()
    assert "input_proj.0.1.weight" in state
    ckpt = tmp_path / "e12.pth"
    torch.save({"model": state}, ckpt)  # no stored flags: the user must give them all
    with pytest.raises(SystemExit, match=r"--epochs 12 \(any value < 25\)"):
        demo.main(["--resume", str(ckpt), "--images", str(tiny["images"]), "--output_dir", str(tmp_path / "o"),
                   *TINY_FLAGS])


def test_list_images(tmp_path):
    for name in ("b.PNG", "a.jpg", "notes.txt", "sub/c.jpeg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert demo.list_images([str(tmp_path)], recursive=False) == [tmp_path / "a.jpg", tmp_path / "b.PNG"]
    assert demo.list_images([str(tmp_path)], recursive=True)[-1] == tmp_path / "sub" / "c.jpeg"
    with pytest.raises(SystemExit, match="missing.jpg"):
        demo.list_images([str(tmp_path / "missing.jpg")], recursive=False)


def test_output_names_do_not_collide(tmp_path):
    used = set()
    first = demo.output_path(tmp_path, Path("x/img.JPG"), used)
    second = demo.output_path(tmp_path, Path("y/img.jpg"), used)
    assert (first.name, second.name) == ("img_det.jpg", "img_det_1.jpg")


def test_coco_names():
    assert len(demo.COCO_NAMES) == 80 and min(demo.COCO_NAMES) == 1 and max(demo.COCO_NAMES) == 90
    assert demo.load_class_names("", 91)[1] == "person" and demo.load_class_names("", 4) == {}
    assert demo.class_name({}, 12) == "class 12"
    # names stored in a checkpoint win over the COCO ones; --ann wins over both
    assert demo.load_class_names("", 91, {1: "circle"}) == {1: "circle"}


def test_ann_names_win_over_checkpoint_names(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"categories": [{"id": 1, "name": "disc"}]}))
    assert demo.load_class_names(str(ann), 4, {1: "circle"}) == {1: "disc"}


MATCH_IOU = 0.5
MIN_RECALL = 0.8  # of the objects, over all images
MIN_PRECISION = 2 / 3  # of the detections: most boxes drawn sit on an object of their class


@pytest.mark.slow
def test_trained_model_boxes_sit_on_the_shapes_with_their_names(overfitted, tmp_path):
    """A model that detects (conftest's `overfitted`), with no --ann: names come from its checkpoint."""
    records = demo.main(["--resume", str(overfitted.checkpoint), "--images", str(overfitted.images),
                         "--output_dir", str(tmp_path), "--threshold", "0.3", "--device", "cpu"])
    coco = json.loads(overfitted.ann.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    file_ids = {img["file_name"]: img["id"] for img in coco["images"]}
    found = matched = objects = 0
    for record in records:
        image_id = file_ids[Path(record["image"]).name]
        truth = [a for a in coco["annotations"] if a["image_id"] == image_id]
        dets = record["detections"]
        assert all(d["name"] == names[d["label"]] for d in dets), dets
        objects, found = objects + len(truth), found + len(dets)
        if not truth or not dets:
            continue
        gt_boxes = box_convert(torch.tensor([a["bbox"] for a in truth]), "xywh", "xyxy")
        iou = box_iou(torch.tensor([d["box_xyxy"] for d in dets]), gt_boxes)
        rows, cols = linear_sum_assignment(-iou.numpy())  # one detection per object, best total IoU
        matched += sum(bool(iou[r, c] >= MATCH_IOU) and dets[r]["name"] == names[truth[c]["category_id"]]
                       for r, c in zip(rows, cols))
    assert matched >= MIN_RECALL * objects, f"{matched} of {objects} objects found with IoU >= {MATCH_IOU}"
    assert matched >= MIN_PRECISION * found, f"{matched} of {found} detections sit on an object of their class"
    assert json.loads((tmp_path / "detections.json").read_text()) == records


# ----------------------------------------------------------------------------- speed flags of main.py

DIVISOR = 64


def _record_inputs(monkeypatch):
    """The input of every call of the model that demo.build_model makes."""
    seen = []
    build = demo.build_model

    def recording_build(args):
        model, criterion, postprocessors = build(args)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        return model, criterion, postprocessors
    monkeypatch.setattr(demo, "build_model", recording_build)
    return seen


def test_amp_off_cuda_runs_float32_with_main_note(tiny, tmp_path, monkeypatch, capsys):
    import engine
    asked = []
    autocast_context = engine.autocast_context

    def spy(device, amp):
        asked.append((device.type, amp))
        return autocast_context(device, amp)
    monkeypatch.setattr(engine, "autocast_context", spy)
    plain = _run(tiny, tmp_path / "fp32", "--threshold", "0")
    amp = _run(tiny, tmp_path / "amp", "--threshold", "0", "--amp", "fp16")
    assert asked[len(plain):] == [("cpu", "fp16")] * len(amp)  # every model call, under engine's autocast
    assert "--amp fp16 applies on CUDA (and bf16 on the CPU); running in float32" in capsys.readouterr().out
    assert [r["detections"] for r in amp] == [r["detections"] for r in plain]  # float32 ran on the CPU


def test_size_divisibility_pads_the_image_the_model_sees(tiny, tmp_path, monkeypatch):
    from util.misc import NestedTensor
    seen = _record_inputs(monkeypatch)
    records = _run(tiny, tmp_path, "--threshold", "0", "--size_divisibility", str(DIVISOR))
    assert len(seen) == len(records) == 3
    for samples, record in zip(seen, records):
        assert isinstance(samples, NestedTensor)
        height, width = resized_hw(width=record["width"], height=record["height"], size=VAL_SIZE, max_size=MAX_SIZE)
        padded = (-(-height // DIVISOR) * DIVISOR, -(-width // DIVISOR) * DIVISOR)
        assert tuple(samples.tensors.shape) == (1, 3, *padded) and padded != (height, width)
        assert not samples.mask[0, :height, :width].any()
        assert samples.mask[0, height:].all() and samples.mask[0, :, width:].all()
    for record in records:  # boxes still in pixels of the original image
        for det in record["detections"]:
            x1, y1, x2, y2 = det["box_xyxy"]
            assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"]


def test_compile_calls_the_model_of_main_compile_model(tiny, tmp_path, monkeypatch):
    compiled = []

    def spy(model, size_divisibility):
        compiled.append((CallCounter(model), size_divisibility))
        return compiled[-1][0]
    monkeypatch.setattr(demo, "compile_model", spy)
    records = _run(tiny, tmp_path / "compiled", "--threshold", "0", "--compile", "--size_divisibility", "32")
    assert [(model.calls, divisor) for model, divisor in compiled] == [(len(records), 32)]
    # the wrapper only counts: the same detections as the demo without --compile
    plain = _run(tiny, tmp_path / "plain", "--threshold", "0", "--size_divisibility", "32")
    assert [r["detections"] for r in records] == [r["detections"] for r in plain]


@pytest.mark.parametrize("flag", [["--amp", "bf16"], ["--compile"]])
def test_onnx_refuses_amp_and_compile(tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        demo.main(["--onnx", str(tmp_path / "model.onnx"), "--images", str(tmp_path), "--output_dir",
                   str(tmp_path / "out"), *flag])
    error = capsys.readouterr().err
    assert f"{flag[0]} apply to the PyTorch model" in error and "float32" in error
