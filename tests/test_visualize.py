"""tools/visualize.py: the recorded numbers are the ones the decoder used (CPU forms and the GPU's
ops), recording changes no detection, and the tool draws a PNG and writes a JSON per image."""
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from PIL import Image

from datasets.synthetic import make_synthetic_coco
from e2e import parse
from models import build_model
from models.attention import split_heads
from models.code_path import gpu_code_path
from models.decoder import ROI_SIZE, per_head
from util.box_ops import box_cxcywh_to_xyxy
from util.checkpoint import checkpoint_args_to_dict
from util.misc import nested_tensor_from_tensor_list

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import visualize  # noqa: E402

VARIANTS = {
    "smca": ["--smca"],
    "multiscale": ["--multiscale"],
    "avgpool": ["--sam_resample", "avgpool"],
    "no_sam": ["--no_sam"],
    "detr": ["--meta_arch", "detr"],
}
EXACT = ("smca", "multiscale", "avgpool")  # SAM-DETR's cross-attention makes its weights anyway
IMAGE_SIZES = ((3, 96, 128), (3, 112, 80))  # two sizes: the second image is padded
TOP = 2
WEIGHTS_ATOL = 1e-5  # the plain attention against the fused kernel, float32


@pytest.fixture(scope="module")
def models():
    """A random-init tiny model per variant, in eval mode, with its flags."""
    built = {}
    for name, flags in VARIANTS.items():
        torch.manual_seed(0)
        args = parse(*flags)
        model, _, _ = build_model(args)
        built[name] = (model.eval(), args)
    return built


def batch():
    torch.manual_seed(1)
    return nested_tensor_from_tensor_list([torch.randn(s) for s in IMAGE_SIZES])


def capture(module, store, name, pre=False):
    """A hook that keeps the module's inputs (pre) or (inputs, output) under store[name]."""
    if pre:
        return module.register_forward_pre_hook(lambda m, args: store.__setitem__(name, args))
    return module.register_forward_hook(lambda m, args, out: store.__setitem__(name, (args, out)))


def sam_seen(model):
    """Hooks on each decoder layer and the sub-modules that receive its boxes, points, scales
    and attention inputs; returns (one dict per layer, handles)."""
    seen, handles = [], []
    for layer in model.transformer.decoder.layers:
        store = {}
        handles += [capture(layer, store, "layer", pre=True), capture(layer.cross_attn, store, "cross_attn")]
        if layer.aligner.enabled:
            handles.append(capture(layer.point_pos_embed, store, "point_pos", pre=True))
        if layer.aligner.salient:
            handles.append(capture(layer.point2, store, "point2"))
        seen.append(store)
    return seen, handles


def check_sam_layer(layer, record, seen):
    _, level, boxes, _, _ = seen["layer"]
    assert torch.equal(record["boxes"], boxes)
    assert tuple(record["map_size"]) == (level.height, level.width)
    assert torch.equal(record["valid_ratio"], level.valid_ratio)
    (q, _, v, bias), out = seen["cross_attn"]
    # the recorded weights are what multiplied the values: they rebuild the attention's output
    rebuilt = layer.cross_attn.out_proj((record["weights"] @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(rebuilt, out, rtol=0, atol=WEIGHTS_ATOL)
    assert torch.allclose(record["weights"].sum(-1), torch.ones(()), atol=WEIGHTS_ATOL)
    if not layer.aligner.enabled:
        assert "points" not in record and "roi_boxes" not in record
        return
    assert torch.equal(record["points"], seen["point_pos"][0])  # the points whose position encoding was used
    if layer.aligner.salient:
        if layer.smca:
            b, nq = boxes.shape[:2]
            scales = seen["point2"][1][:, layer.num_points * 2:].reshape(b, nq, layer.num_points, 2)
            assert torch.equal(record["scales"], per_head(scales, layer.nhead))
            # the attention's bias is the recorded prior plus the padding bias
            assert torch.equal(bias, record["smca_prior"] + level.attn_bias)
    else:
        assert torch.equal(record["points"], boxes[:, :, None, :2].expand_as(record["points"]))
        torch.testing.assert_close(record["roi_boxes"] / record["box_scale"], box_cxcywh_to_xyxy(boxes))


@pytest.mark.parametrize("gpu_ops", [False, True], ids=["cpu_forms", "gpu_code_path"])
@pytest.mark.parametrize("variant", ["smca", "multiscale", "avgpool", "no_sam"])
@torch.inference_mode()
def test_sam_records_what_the_decoder_used(models, variant, gpu_ops):
    model, _ = models[variant]
    samples = batch()
    with gpu_code_path() if gpu_ops else nullcontext():
        plain = model(samples)
        with visualize.recording(visualize.recorded_modules(model, "sam_detr")) as records:
            recorded = model(samples)
        seen, handles = sam_seen(model)
        with visualize.recording(visualize.recorded_modules(model, "sam_detr")) as hooked_records:
            model(samples)
        for h in handles:
            h.remove()
    for key in ("pred_logits", "pred_boxes"):
        if variant in EXACT:
            assert torch.equal(recorded[key], plain[key]), key
        else:  # the plain attention replaces the fused kernel
            torch.testing.assert_close(recorded[key], plain[key], rtol=0, atol=WEIGHTS_ATOL)
    for layer, record, hooked, store in zip(model.transformer.decoder.layers, records, hooked_records, seen):
        assert record.keys() == hooked.keys() and all(
            torch.equal(record[k], hooked[k]) if isinstance(record[k], torch.Tensor) else record[k] == hooked[k]
            for k in record)
        check_sam_layer(layer, hooked, store)
    assert all(layer.recorder is None and layer.cross_attn.recorder is None
               for layer in model.transformer.decoder.layers)


@pytest.mark.parametrize("gpu_ops", [False, True], ids=["cpu_forms", "gpu_code_path"])
@torch.inference_mode()
def test_detr_records_its_last_cross_attention(models, gpu_ops):
    model, _ = models["detr"]
    samples = batch()
    attn = model.transformer.decoder.layers[-1].multihead_attn
    seen = {}
    with gpu_code_path() if gpu_ops else nullcontext():
        plain = model(samples)
        handle = capture(attn, seen, "attn")
        with visualize.recording(visualize.recorded_modules(model, "detr")) as records:
            with visualize.detr_map_size(model, records[0]):
                recorded = model(samples)
        handle.remove()
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(recorded[key], plain[key], rtol=0, atol=WEIGHTS_ATOL)
    (_, _, value, _), out = seen["attn"]
    weights = records[0]["weights"]
    rebuilt = attn.out_proj((weights @ split_heads(value, attn.nhead)).transpose(1, 2).flatten(2))
    torch.testing.assert_close(rebuilt, out, rtol=0, atol=WEIGHTS_ATOL)
    mask = records[0]["mask"]
    assert weights.shape[-1] == mask[0].numel() and not mask[0].any() and mask[1].any()  # image 1 is padded
    assert float(weights.masked_select(mask.flatten(1)[:, None, None]).abs().max()) == 0  # padding unread


@pytest.fixture(scope="module")
def checkpoints(models, module_tmp):
    root = module_tmp("visualize")
    make_synthetic_coco(out_dir=root / "shapes", num_train=0, num_val=1, image_size=80, seed=0)
    paths = {}
    for name, (model, args) in models.items():
        paths[name] = root / f"{name}.pth"
        torch.save({"model": model.state_dict(), "args": checkpoint_args_to_dict(args)}, paths[name])
    return paths, root / "shapes" / "val2017"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tool_draws_png_and_json(models, checkpoints, variant, tmp_path):
    paths, images = checkpoints
    results = visualize.main(["--resume", str(paths[variant]), "--images", str(images), "--output_dir",
                              str(tmp_path), "--device", "cpu", "--top", str(TOP), "--threshold", "0"])
    model, args = models[variant]
    (result,) = results
    png = Path(result["output"])
    assert png.suffix == ".png" and png.parent == tmp_path
    with Image.open(png) as drawn:
        assert drawn.size[0] > 0
    assert json.loads(png.with_suffix(".json").read_text()) == visualize.to_json(result)
    dets = result["detections"]
    assert len(dets) == TOP and len({d["query"] for d in dets}) == TOP
    assert dets[0]["score"] >= dets[1]["score"]
    if variant == "detr":
        assert all(d["attention"].shape[0] == args.nheads for d in dets)
        return
    initial = model.query_embed.weight.detach().sigmoid()
    for det in dets:
        layers = det["layers"]
        assert len(layers) == args.dec_layers
        # the first reference is the learnt initial box of the detection's query
        torch.testing.assert_close(layers[0]["reference_box"], initial[det["query"]])
        assert [l["level"] for l in layers] == list(model.transformer.decoder.level_of_layer)
        for layer in layers:
            assert layer["attention"].shape[0] == args.nheads
            assert ("points" in layer) == (variant != "no_sam")
            assert ("smca_prior" in layer) == (variant == "smca")
            assert ("roi_box" in layer) == (variant == "avgpool")
            if variant == "avgpool":
                assert layer["roi_grid"] == ROI_SIZE
    if variant == "multiscale":
        assert len({l["level"] for l in dets[0]["layers"]}) == args.dec_layers  # one level per layer here
