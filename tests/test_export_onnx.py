"""ONNX export (tools/export_onnx.py, models/export.py): onnxruntime on the CPU against PyTorch eager.

Every official configuration (R50, R50-DC5, R50-MS, each with and without SMCA) is exported once,
structurally as the official model but narrow and shallow to stay fast on two cores (resnet18
stands in for resnet50 where the backbone has no dilation; DC5 needs resnet50's bottleneck
blocks), and so is the original DETR (--meta_arch detr), without and with post-processing. Each
exported file runs at image sizes other than the traced example's, batch sizes of 1 and 2, with
padding. DETR's DC5 variant is left out: its only difference, the dilated backbone, is SAM-DETR's
DC5 backbone, exported above.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

import demo
from datasets.synthetic import CATEGORIES, make_synthetic_coco
from main import get_args_parser
from models import build_model
from models.detr import NO_OBJECT_LOGITS, DETRPostProcess
from models.export import (CLASS_NAMES_KEY, EXAMPLE_SIZE, OPSET, OnnxRuntimeDetector, decode_class_names,
                           encode_class_names, export_onnx, postprocessor, postprocessor_of)
from models.decoder import ROI_SIZE
from models.ops import level_start_index, ms_deform_attn, ms_deform_attn_pytorch
from models.roi import roi_align_boxes
from models.sam_detr import PostProcess
from tools import export_onnx as export_tool
from util.checkpoint import checkpoint_args_to_dict
from util.misc import NestedTensor

TOLERANCE = 1e-4
NUM_CLASSES = 5
NUM_QUERIES = 12
SMALL_FLAGS = ["--hidden_dim", "64", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2",
               "--dim_feedforward", "128", "--num_queries", str(NUM_QUERIES), "--num_classes", str(NUM_CLASSES),
               "--no_pretrained_backbone", "--device", "cpu", "--val_size", "96", "--max_size", "128"]
CONFIGS = {
    "r50": ["--backbone", "resnet18"],
    "r50_smca": ["--backbone", "resnet18", "--smca", "--epochs", "12"],
    "dc5": ["--backbone", "resnet50", "--dilation"],
    "dc5_smca": ["--backbone", "resnet50", "--dilation", "--smca"],
    "ms": ["--backbone", "resnet18", "--multiscale"],
    "ms_smca": ["--backbone", "resnet18", "--multiscale", "--smca"],
    "detr": ["--meta_arch", "detr", "--backbone", "resnet18"],
    "detr_postprocess": ["--meta_arch", "detr", "--backbone", "resnet18"],
}
# (batch, height, width, valid (h, w) of each image): neither size is the traced example's
RUN_SHAPES = [(2, 96, 128, [(96, 128), (70, 90)]), (1, 160, 96, [(160, 96)])]
STANDARD_DOMAINS = ("", "ai.onnx")
# exported through the command-line tool from a checkpoint (no model flags), with post-processing and
# the optimised graph -> the post-processor whose detections the file must reproduce
POSTPROCESS_CONFIGS = {"r50": PostProcess, "detr_postprocess": DETRPostProcess}
# the class names main.py stores in that configuration's checkpoint: the synthetic shapes (ids 1-3)
CLASS_NAMES = {c["id"]: c["name"] for c in CATEGORIES}


def _args(flags):
    return argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(SMALL_FLAGS + flags)


def _padded_batch(batch, height, width, valid, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.ones(batch, height, width, dtype=torch.bool)
    for m, (h, w) in zip(mask, valid):
        m[:h, :w] = False
    return images.masked_fill(mask[:, None], 0.0), mask


_EXPORTS = {}  # configuration -> (name, eager model, onnxruntime detector, file): one export each


def _exported(name, tmp_path_factory):
    if name not in _EXPORTS:
        _EXPORTS[name] = _export(name, tmp_path_factory.mktemp(f"onnx_{name}"))
    return _EXPORTS[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    return _exported(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=list(POSTPROCESS_CONFIGS))
def exported_with_postprocess(request, tmp_path_factory):
    return _exported(request.param, tmp_path_factory)


def _is_detr(name: str) -> bool:
    return "detr" in CONFIGS[name]


def _logits_per_query(name: str) -> int:
    """num_classes sigmoid logits (SAM-DETR), or num_classes + 1 softmax logits (DETR)."""
    return NUM_CLASSES + (NO_OBJECT_LOGITS if _is_detr(name) else 0)


def _export(name, root):
    torch.manual_seed(0)
    args = _args(CONFIGS[name])
    model, _, _ = build_model(args)
    model.eval()
    path = root / f"{name}.onnx"
    if name in POSTPROCESS_CONFIGS:
        ckpt = root / f"{name}.pth"
        torch.save({"model": model.state_dict(), "args": checkpoint_args_to_dict(args), "class_names": CLASS_NAMES},
                   ckpt)
        # no model flags: they must come from the checkpoint
        export_tool.main(["--resume", str(ckpt), "--output", str(path), "--postprocess"])
    else:
        # the exporter's graph optimiser (a third of the export time) runs on the tool's export only
        export_onnx(model, path, optimize=False)
    return name, model, OnnxRuntimeDetector(path), path


def test_onnxruntime_matches_eager_at_other_sizes_and_batches(exported):
    _, model, detector, _ = exported
    for batch, height, width, valid in RUN_SHAPES:
        assert (height, width) != EXAMPLE_SIZE
        images, mask = _padded_batch(batch, height, width, valid)
        with torch.inference_mode():
            expected = model(NestedTensor(images, mask))
        got = detector.run(images, mask, torch.tensor(valid))
        for key in ("pred_logits", "pred_boxes"):
            assert got[key].shape == expected[key].shape
            diff = (got[key] - expected[key]).abs().max().item()
            assert diff <= TOLERANCE, f"{key} at {batch}x{height}x{width}: {diff:.2e}"
        # the model is not trivially constant: different images give different outputs
        assert expected["pred_logits"].std() > 1e-3


def test_graph_has_dynamic_axes_and_only_standard_ops(exported):
    name, _, detector, path = exported
    inputs = {i.name: i.shape for i in detector.session.get_inputs()}
    assert inputs["images"][1] == 3 and inputs["mask"][0] == inputs["images"][0]
    for axis in (0, 2, 3):
        assert isinstance(inputs["images"][axis], str), f"images axis {axis} is fixed: {inputs['images']}"
    assert all(isinstance(d, str) for d in inputs["mask"]), inputs["mask"]
    outputs = {o.name: o.shape for o in detector.session.get_outputs()}
    assert isinstance(outputs["pred_logits"][0], str)
    assert outputs["pred_logits"][1:] == [NUM_QUERIES, _logits_per_query(name)]
    assert outputs["pred_boxes"][1:] == [NUM_QUERIES, 4]
    assert detector.logits_per_query == _logits_per_query(name)
    model = onnx.load(str(path))
    assert not model.functions, "exported graph calls local functions"
    assert all(node.domain in STANDARD_DOMAINS for node in model.graph.node)
    assert {o.domain: o.version for o in model.opset_import}.get("", 0) >= OPSET
    op_types = {node.op_type for node in model.graph.node}
    if _is_detr(name):  # plain attention over the C5 map: nothing sampled
        assert not {"RoiAlign", "GridSample"} & op_types
        return
    assert {"RoiAlign", "GridSample"} <= op_types
    if name.startswith("ms"):
        # deformable attention: one GridSample per level, plus the decoder's point sampling
        assert sum(node.op_type == "GridSample" for node in model.graph.node) > 1


def test_postprocess_outputs_match_postprocess_module(exported_with_postprocess):
    name, model, detector, _ = exported_with_postprocess
    images, mask = _padded_batch(2, 96, 128, [(96, 128), (70, 90)], seed=1)
    orig_sizes = torch.tensor([[480, 640], [350, 450]])
    with torch.inference_mode():
        expected = POSTPROCESS_CONFIGS[name]()(model(NestedTensor(images, mask)), orig_sizes)
    got = detector.run(images, mask, orig_sizes)
    assert got["labels"].dtype == torch.int64
    # SAM-DETR: the top min(100, Q * C) (query, class) pairs; DETR: every query, once
    detections = NUM_QUERIES if _is_detr(name) else min(100, NUM_QUERIES * NUM_CLASSES)
    assert got["scores"].shape == got["labels"].shape == (2, detections) and got["boxes"].shape == (2, detections, 4)
    for i, image in enumerate(expected):
        assert torch.equal(got["labels"][i], image["labels"])
        torch.testing.assert_close(got["scores"][i], image["scores"], rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(got["boxes"][i], image["boxes"], rtol=0, atol=TOLERANCE * 640)
    # the tool stored the architecture flags for demo.py --onnx
    assert detector.metadata["num_classes"] == NUM_CLASSES and detector.metadata["val_size"] == 96
    assert detector.metadata["meta_arch"] == ("detr" if _is_detr(name) else "sam_detr")


def test_demo_with_onnx_writes_the_same_files(exported_with_postprocess, tmp_path):
    _, _, _, path = exported_with_postprocess
    ann = make_synthetic_coco(out_dir=tmp_path / "shapes", num_train=0, num_val=2, image_size=80, seed=0)["val"]
    images = tmp_path / "shapes" / "val2017"
    ckpt = next(Path(path).parent.glob("*.pth"))
    common = ["--images", str(images), "--threshold", "0", "--ann", str(ann)]
    eager = demo.main(["--resume", str(ckpt), "--output_dir", str(tmp_path / "eager"), "--device", "cpu", *common])
    onnx_run = demo.main(["--onnx", str(path), "--output_dir", str(tmp_path / "onnx"), *common])
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(p.name for p in (tmp_path / "eager").iterdir())
    assert json.loads((tmp_path / "onnx" / demo.JSON_NAME).read_text()) == onnx_run
    assert len(eager) == len(onnx_run) == 2
    for e, o in zip(eager, onnx_run):
        assert (e["image"], e["width"], e["height"]) == (o["image"], o["width"], o["height"])
        assert [d["label"] for d in e["detections"]] == [d["label"] for d in o["detections"]]
        assert [d["name"] for d in e["detections"]] == [d["name"] for d in o["detections"]]
        np.testing.assert_allclose([d["score"] for d in o["detections"]], [d["score"] for d in e["detections"]],
                                   atol=TOLERANCE)
        np.testing.assert_allclose([d["box_xyxy"] for d in o["detections"]], [d["box_xyxy"] for d in e["detections"]],
                                   atol=TOLERANCE * 100)


def test_demo_with_onnx_names_classes_from_the_file(exported_with_postprocess, tmp_path):
    """No --ann: the PyTorch demo names the classes from the checkpoint, the ONNX demo from the file."""
    name, _, detector, path = exported_with_postprocess
    assert detector.class_names == CLASS_NAMES
    stored = {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}
    assert json.loads(stored[CLASS_NAMES_KEY]) == {str(k): v for k, v in CLASS_NAMES.items()}
    make_synthetic_coco(out_dir=tmp_path / "shapes", num_train=0, num_val=1, image_size=80, seed=0)
    common = ["--images", str(tmp_path / "shapes" / "val2017"), "--threshold", "0"]
    ckpt = next(Path(path).parent.glob("*.pth"))
    eager = demo.main(["--resume", str(ckpt), "--output_dir", str(tmp_path / "eager"), "--device", "cpu", *common])
    onnx_run = demo.main(["--onnx", str(path), "--output_dir", str(tmp_path / "onnx"), *common])
    detections = onnx_run[0]["detections"]
    if not _is_detr(name):  # threshold 0: every (query, class) pair, so every class (DETR: one per query)
        assert {d["label"] for d in detections} >= set(CLASS_NAMES)
    for det in detections:
        assert det["name"] == CLASS_NAMES.get(det["label"], f"class {det['label']}")
    assert [d["name"] for d in detections] == [d["name"] for d in eager[0]["detections"]]


def test_demo_with_onnx_refuses_a_contradicting_meta_arch(exported_with_postprocess, tmp_path):
    """The file's detections would go through the other architecture's post-processor."""
    name, _, _, path = exported_with_postprocess
    other = "sam_detr" if _is_detr(name) else "detr"
    with pytest.raises(SystemExit, match=f"{_logits_per_query(name)} values per query, but --meta_arch {other}"):
        demo.main(["--onnx", str(path), "--images", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                   "--meta_arch", other])


@pytest.mark.parametrize("arch", ["sam_detr", "detr"])
def test_postprocessor_of_an_architecture_is_the_one_build_model_pairs_with_it(arch):
    """What demo.py --onnx (by the file's meta_arch) and the exported graph (by the model) use."""
    model, _, postprocessors = build_model(_args(["--meta_arch", arch, "--backbone", "resnet18"]))
    assert type(postprocessor(arch)) is type(postprocessors["bbox"]) is type(postprocessor_of(model))


def test_class_names_metadata_round_trip():
    names = {10: "ten", 2: "two"}
    assert decode_class_names(encode_class_names(names)) == names
    assert list(json.loads(encode_class_names(names))) == ["2", "10"]  # ids in order
    assert decode_class_names("{}") == {}  # a file without names


class _RoIAlign(nn.Module):
    def forward(self, features: Tensor, boxes: Tensor) -> Tensor:
        return roi_align_boxes(features, boxes, ROI_SIZE)


class _DeformableSampling(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.shapes = shapes

    def forward(self, value: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
        spatial_shapes = torch.tensor(self.shapes)
        return ms_deform_attn(value, spatial_shapes, level_start_index(spatial_shapes), locations, weights)


def _onnx_run(module: nn.Module, inputs, path: Path):
    program = torch.onnx.export(module.eval(), inputs, dynamo=True, opset_version=OPSET, verbose=False)
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})[0]


def test_roi_align_export_matches_torchvision_on_awkward_boxes(tmp_path):
    """Boxes smaller than a cell, partly and wholly off the map, and spanning many cells (adaptive
    sampling of several points per bin)."""
    features = torch.randn(2, 8, 10, 13, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[1.2, 1.3, 1.5, 1.9], [-3.0, -2.0, 4.0, 5.0], [11.0, 8.0, 16.0, 14.0], [0.0, 0.0, 13.0, 10.0]],
                          [[2.5, 2.5, 2.5, 2.5], [-5.0, -5.0, -1.0, -1.0], [3.3, 0.7, 12.9, 9.6], [6.0, 2.0, 6.4, 9.0]]])
    expected = roi_align_boxes(features, boxes, ROI_SIZE)
    # the batched rois of roi_align_boxes are torchvision's own per-image boxes
    per_image = torch.cat([roi_align(features[b:b + 1], [boxes[b]], ROI_SIZE, aligned=True) for b in range(2)])
    assert torch.equal(expected, per_image)
    got = _onnx_run(_RoIAlign(), (features, boxes), tmp_path / "roi.onnx")
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)


def test_deformable_attention_export_matches_fast_path(tmp_path):
    """Sampling points inside, on the edge of and off the maps, exported as GridSample."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(6, 9), (3, 5)]
    batch, queries, heads, channels, points = 2, 7, 2, 4, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, channels, generator=generator)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator)
    spatial_shapes = torch.tensor(shapes)
    expected = ms_deform_attn_pytorch(value, spatial_shapes, level_start_index(spatial_shapes), locations, weights)
    got = _onnx_run(_DeformableSampling(shapes), (value, locations, weights), tmp_path / "deform.onnx")
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)


class _SpecialisingModel(nn.Module):
    """Turns the image width into data: the graph would only hold for the example's width."""

    def forward(self, samples: NestedTensor):
        width = samples.tensors.new_tensor(samples.tensors.shape[-1])
        logits = samples.tensors.mean((1, 2, 3))[:, None, None].expand(-1, 1, NUM_CLASSES) * width
        return {"pred_logits": logits, "pred_boxes": logits[..., :4].sigmoid()}


def test_export_refuses_to_fix_shapes(tmp_path):
    with pytest.raises(Exception, match="width"):
        export_onnx(_SpecialisingModel(), tmp_path / "fixed.onnx")
    assert not (tmp_path / "fixed.onnx").exists()
