"""The models against numbers computed by the official SAM-DETR code, and DETR's against DETR's
own code (tests/fixtures/README.md).

One full-size model per configuration; tolerances are the fixtures' README's. Each runs twice:
as built (the CPU's forms: on the CPU SAM-DETR's decoder reads its RoIs in the separable form,
models/roi.py) and with the GPU's ops (gpu_code_path: torchvision's RoIAlign kernel).
"""
import contextlib

import pytest
import torch

from models.code_path import gpu_code_path
from parity import CONFIGS, DETR_CONFIGS, build_filled, load_fixture

ROI_FORMS = {"default": contextlib.nullcontext, "kernel": gpu_code_path}


def assert_close_out(actual, expected, what):
    tol = 1e-4 + 1e-4 * expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module", params=[(c, f) for c in CONFIGS + DETR_CONFIGS for f in ROI_FORMS], ids="-".join)
def run(request):
    """Builds, fills and runs one configuration once: eval outputs with intermediates, eval
    losses, post-processing, then a train-mode backward."""
    config, roi_form = request.param
    with ROI_FORMS[roi_form]():
        return _run(load_fixture(config))


def _run(fx):
    model, criterion, postprocessors = build_filled(fx["flags"])
    captured = {}
    hooks = [
        model.backbone[0].register_forward_hook(lambda m, i, o: captured.__setitem__("backbone", o)),
        model.transformer.encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("memory", o)),
        model.transformer.register_forward_hook(lambda m, i, o: captured.__setitem__("decoder", o)),
    ]
    model.eval()
    with torch.no_grad():
        eval_out = model(fx["images"])
        eval_losses = criterion(eval_out, fx["targets"])
        post = postprocessors["bbox"](eval_out, fx["target_sizes"])
    for h in hooks:
        h.remove()
    model.train()
    model.zero_grad()
    train_out = model(fx["images"])
    train_losses = criterion(train_out, fx["targets"])
    total = sum(train_losses[k] * criterion.weight_dict[k] for k in train_losses if k in criterion.weight_dict)
    total.backward()
    return dict(fx=fx, model=model, eval_out=eval_out, eval_losses=eval_losses, post=post,
                captured=captured, train_loss=total.item())


def test_state_dict_names_shapes_and_counts(run):
    fx, model = run["fx"], run["model"]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == [(k, tuple(s)) for k, s in fx["keys"]]
    assert sum(p.numel() for p in model.parameters()) == fx["n_params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == fx["n_trainable"]


def test_official_state_dict_loads_strict(run):
    model = run["model"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)


def test_eval_outputs(run):
    out, expected = run["eval_out"], run["fx"]["eval_out"]
    assert_close_out(out["pred_logits"], expected["pred_logits"], "pred_logits")
    assert_close_out(out["pred_boxes"], expected["pred_boxes"], "pred_boxes")
    assert_close_out(torch.stack([a["pred_logits"] for a in out["aux_outputs"]]), expected["aux_logits"], "aux_logits")
    assert_close_out(torch.stack([a["pred_boxes"] for a in out["aux_outputs"]]), expected["aux_boxes"], "aux_boxes")


def test_intermediates(run):
    expected, captured = run["fx"]["intermediates"], run["captured"]
    levels = captured["backbone"]
    assert len(levels) == len(expected["backbone_masks"])
    for lvl, (nt, stats, mask) in enumerate(zip(levels, expected["backbone_feature_stats"], expected["backbone_masks"])):
        ours = torch.stack([nt.tensors.mean(), nt.tensors.std()])
        assert_close_out(ours, stats, f"backbone level {lvl} mean/std")
        assert torch.equal(nt.mask, mask), f"backbone mask level {lvl}"
    memory = captured["memory"]
    if memory.shape != expected["encoder_memory"].shape:
        memory = memory.transpose(0, 1)  # single scale: the official layout is (HW, B, C)
    assert_close_out(memory, expected["encoder_memory"], "encoder memory")
    if "decoder_hidden" in expected:  # DETR: the decoder's normed outputs, layers x queries x batch x C
        assert_close_out(captured["decoder"].transpose(1, 2), expected["decoder_hidden"], "decoder hidden states")
    else:
        assert_close_out(captured["decoder"].references, expected["decoder_references"], "decoder references")


def test_eval_losses(run):
    losses, expected = run["eval_losses"], run["fx"]["eval_losses"]
    assert set(losses) == set(expected)
    for k, v in expected.items():
        assert losses[k].item() == pytest.approx(v, rel=1e-3, abs=1e-6), k


def test_postprocess(run):
    for i, (ours, theirs) in enumerate(zip(run["post"], run["fx"]["postprocess"])):
        assert torch.equal(ours["labels"], theirs["labels"]), f"labels of image {i}"
        assert_close_out(ours["scores"], theirs["scores"], f"scores of image {i}")
        # Detections whose scores agree to float precision may come out of top-k in either
        # order (the filled weights give many near-ties), so boxes are matched one-to-one
        # among those of equal label and score.
        score_tol = 1e-4 + 1e-4 * theirs["scores"].abs().max().item()
        box_tol = 1e-4 + 1e-4 * theirs["boxes"].abs().max().item()
        unused = set(range(len(theirs["boxes"])))
        for k in range(len(ours["boxes"])):
            match = next((j for j in sorted(unused)
                          if theirs["labels"][j] == ours["labels"][k]
                          and abs(theirs["scores"][j] - ours["scores"][k]) <= score_tol
                          and (theirs["boxes"][j] - ours["boxes"][k]).abs().max() <= box_tol), None)
            if match is None:
                # at the top-k cut-off a tie may let in either of two detections
                at_cutoff = ours["scores"][k] - theirs["scores"].min() <= score_tol
                assert at_cutoff, f"image {i}: detection {k} {ours['boxes'][k].tolist()} has no official twin"
                continue
            unused.remove(match)


def test_train_loss_and_gradients(run):
    fx, model = run["fx"], run["model"]
    assert run["train_loss"] == pytest.approx(fx["train_loss"], rel=1e-3)
    params = dict(model.named_parameters())
    no_grad = sorted(n for n, p in params.items() if p.requires_grad and p.grad is None)
    assert no_grad == sorted(fx["no_grad"])
    for name, expected in fx["grad_norms"].items():
        norm = params[name].grad.norm().item()
        assert abs(norm - expected) <= 1e-3 + 2e-3 * abs(expected), f"grad norm of {name}: {norm} vs {expected}"
    assert set(fx["grad_norms"]) == {n for n, p in params.items() if p.grad is not None}
