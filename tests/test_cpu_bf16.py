"""--amp bf16 on the CPU: autocast really runs (the backbone's convolutions and the transformer's
matmuls in bfloat16, losses and matching in float32), evaluation stays close to float32, and a CPU
without bfloat16 units (where bfloat16 runs slower than float32) runs float32 and says so. The
bfloat16 tests run on any CPU: without the units autocast computes the same numbers, only slower."""
import warnings

import pytest
import torch

import engine
import main
import util.misc as utils
from conftest import OVERFIT_BATCH, OVERFIT_FLAGS
from datasets import build_dataset, get_coco_api_from_dataset
from e2e import TINY
from models import build_model, load_weights

CPU = torch.device("cpu")
AP50_MARGIN = 0.02     # the bound between bf16 and fp32 evaluation
SCORE_MARGIN = 0.05    # per detection score, bfloat16 rounding through the whole model


BF16_CPU = {"architecture": "x86_64", "cpu_name": "Xeon", "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}
AVX2_CPU = {"architecture": "x86_64", "cpu_name": "EPYC", "avx2": True, "avx512_bf16": False, "amx_bf16": False}
ARM_BF16_CPU = {"architecture": "arm64", "cpu_name": "Neoverse-V1", "neon": True, "bf16": True}


@pytest.fixture
def bf16_units(monkeypatch):
    """This CPU taken for one with bfloat16 units, so that --amp bf16 autocasts whatever it has."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: BF16_CPU)


def _model(*flags):
    args = main.get_args_parser().parse_args(TINY + list(flags))
    main.check_args(args)
    torch.manual_seed(0)
    return build_model(args)


def _batch():
    images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)),
              torch.rand(3, 112, 96, generator=torch.Generator().manual_seed(1))]
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.2], [0.7, 0.6, 0.2, 0.3]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return utils.nested_tensor_from_tensor_list(images), targets


@pytest.mark.usefixtures("bf16_units")
@pytest.mark.parametrize("flags", [["--smca"], ["--smca", "--multiscale"], ["--meta_arch", "detr"]])
def test_bf16_autocast_runs_on_the_cpu_and_losses_stay_float32(flags):
    model, criterion, _ = _model(*flags)
    model.train()
    samples, targets = _batch()
    with engine.autocast_context(CPU, "bf16"):
        feats, _, _ = model.backbone(samples)
    assert all(f.dtype == torch.bfloat16 for f in feats)  # the ResNet's convolutions ran in bfloat16
    total, layer_losses, outputs = engine.compute_losses(model, criterion, samples, targets, CPU, "bf16")
    assert outputs["pred_logits"].dtype == torch.bfloat16  # the heads too
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in layer_losses.values())
    total.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.usefixtures("bf16_units")
def test_fp16_and_no_amp_do_not_autocast_on_the_cpu():
    assert not engine.autocast_runs(CPU, "fp16") and not engine.autocast_runs(CPU, None)
    assert engine.autocast_runs(CPU, "bf16")


def test_the_smca_prior_is_added_in_float32_under_bf16():
    """baddbmm under autocast would round the prior (hundreds, where bfloat16 steps by 2) into
    bfloat16 and change which keys are attended; the logits are float32 instead."""
    from models.attention import shared_key_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 8) * 0.1, torch.randn(1, 5, 8) * 0.1, torch.randn(1, 2, 5, 4)
    bias = torch.tensor([-300.0, -300.5, -301.0, -299.25, -300.75]).expand(1, 2, 3, 5).contiguous()
    expected = shared_key_attention(q, k, v, bias, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = shared_key_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, 0.0)
        rounded = shared_key_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias.bfloat16(), 0.0)
    error, rounded_error = (out.float() - expected).abs().max(), (rounded.float() - expected).abs().max()
    assert error < 0.03 and rounded_error > 5 * error


@pytest.mark.usefixtures("bf16_units")
def test_eval_in_bf16_keeps_the_detections_and_ap_of_float32(overfitted):
    args = main.get_args_parser().parse_args(OVERFIT_FLAGS + ["--coco_path", str(overfitted.root), "--val_img_dir",
                                                             str(overfitted.images), "--val_ann", str(overfitted.ann)])
    model, criterion, postprocessors = build_model(args)
    load_weights(model, torch.load(overfitted.checkpoint, weights_only=True)["model"])
    dataset = build_dataset("val", args)
    loader = torch.utils.data.DataLoader(dataset, batch_size=OVERFIT_BATCH, collate_fn=utils.collate_fn)
    coco = get_coco_api_from_dataset(dataset)
    stats = {amp: engine.evaluate(model, criterion, postprocessors, loader, coco, CPU, amp=amp)[0]
             for amp in (None, "bf16")}
    assert stats["bf16"]["coco_eval_bbox"][1] == pytest.approx(stats[None]["coco_eval_bbox"][1], abs=AP50_MARGIN)
    samples, _ = next(iter(loader))
    with torch.no_grad():
        fp32 = model(samples)["pred_logits"].sigmoid()
        with engine.autocast_context(CPU, "bf16"):
            bf16 = model(samples)["pred_logits"].float().sigmoid()
    assert (bf16 - fp32).abs().max() < SCORE_MARGIN


@pytest.mark.parametrize("capabilities, units", [(BF16_CPU, ("avx512_bf16", "amx_bf16")), (AVX2_CPU, ()),
                                                  (ARM_BF16_CPU, ("bf16",)), ({"architecture": "x86_64"}, ())])
def test_bf16_units_are_read_from_torchs_cpu_capabilities(monkeypatch, capabilities, units):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert engine.cpu_bf16_units() == units
    assert engine.autocast_runs(CPU, "bf16") == bool(units)
    assert isinstance(engine.autocast_context(CPU, "bf16"), torch.autocast) == bool(units)


def test_a_cpu_without_bf16_units_runs_float32_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: AVX2_CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a line, as for --amp fp16 on the CPU, not a warning
        main.check_args(main.get_args_parser().parse_args(TINY + ["--amp", "bf16"]))
    note = capsys.readouterr().out
    for part in ("--amp bf16", "EPYC, x86_64, avx2", "no bfloat16 units", "avx512_bf16, amx_bf16",
                 "running in float32"):
        assert part in note
    samples, _ = _batch()
    with engine.autocast_context(CPU, "bf16"):
        assert _model()[0].backbone(samples)[0][0].dtype == torch.float32
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: BF16_CPU)
    main.check_args(main.get_args_parser().parse_args(TINY + ["--amp", "bf16"]))
    assert "--amp" not in capsys.readouterr().out
