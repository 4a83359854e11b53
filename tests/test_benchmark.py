"""tools/benchmark.py: official parameter counts, FLOP handles, and a tiny speed run."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from e2e import CallCounter
from tools import benchmark

SMALL_IMAGE = ["--size", "64", "96"]
# A small, fast model: every stage of the pipeline runs, at a fraction of the cost.
TINY_MODEL = ["--backbone", "resnet18", "--hidden_dim", "64", "--nheads", "8", "--dim_feedforward", "128",
              "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "10", "--num_classes", "5"]
TINY_SPEED = SMALL_IMAGE + ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--train"]

# n_parameters of the official training logs (trainable) and the parity fixtures (all).
OFFICIAL_PARAMS = {
    "r50_50ep": ([], 58_295_946, 58_073_546),
    "r50_12ep": (["--epochs", "12"], None, 58_074_058),
    "r50_smca_12ep": (["--smca", "--epochs", "12"], 58_345_706, 58_123_306),
    "r50_dc5_smca_50ep": (["--dilation", "--smca"], 58_345_194, 58_122_794),
    "r50_ms": (["--multiscale"], None, 54_972_298),
    "r50_ms_smca": (["--multiscale", "--smca"], 55_243_946, 55_021_546),
    # DETR's published R50 and R50-DC5 logs (n_parameters) and its parity fixtures
    "detr_r50": (["--meta_arch", "detr"], 41_524_768, 41_302_368),
    "detr_r50_dc5": (["--meta_arch", "detr", "--dilation"], 41_524_768, 41_302_368),
}


def parse(flags):
    return benchmark.parse_args(list(flags) + ["--device", "cpu"])


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_official_parameter_counts(name):
    flags, total, trainable = OFFICIAL_PARAMS[name]
    model, _ = benchmark.build(parse(flags))
    got_total, got_trainable = benchmark.count_parameters(model)
    assert got_trainable == trainable
    if total is not None:
        assert got_total == total


@pytest.mark.parametrize("flags, special_op", [
    (["--smca", "--epochs", "12"], "roi_align"),
    (["--multiscale", "--smca"], "PythonOp._SparseSamplingFunction"),
])
def test_full_size_flops_count_the_special_ops(flags, special_op):
    args = parse(flags + SMALL_IMAGE)
    model, _ = benchmark.build(args)
    gflops, by_op, uncounted = benchmark.count_flops(model, torch.randn(3, *args.size))
    assert gflops > 0
    assert gflops == pytest.approx(sum(by_op.values()))
    for op in ("conv", "linear", "scaled_dot_product_attention", "roi_align", "grid_sampler", special_op):
        assert by_op.get(op, 0) > 0, op
    counted = set(benchmark.FLOP_HANDLES) | {"aten::grid_sampler"}
    assert not counted & set(uncounted)


def test_full_size_detr_flops_need_no_other_handle():
    args = parse(["--meta_arch", "detr"] + SMALL_IMAGE)
    model, _ = benchmark.build(args)
    gflops, by_op, uncounted = benchmark.count_flops(model, torch.randn(3, *args.size))
    assert gflops == pytest.approx(sum(by_op.values()))
    for op in ("conv", "linear", "scaled_dot_product_attention"):
        assert by_op.get(op, 0) > 0, op
    assert "roi_align" not in by_op and "grid_sampler" not in by_op  # SAM-DETR's ops only
    # what stays uncounted is elementwise: no matmul, convolution or attention of DETR is missed
    assert not {op for op in uncounted if any(k in op for k in ("mm", "conv", "attention", "linear", "einsum"))}


@pytest.mark.parametrize("preset, dilation", [("detr", False), ("detr_dc5", True)])
def test_detr_presets_take_detr_defaults(preset, dilation):
    args = benchmark.with_preset(benchmark.parse_raw(["--device", "cpu"]), preset)
    assert (args.meta_arch, args.dilation, args.num_queries, args.cls_loss_coef) == ("detr", dilation, 100, 1.0)
    assert benchmark.config_name(args) == preset
    # SAM-DETR's presets from the same command line keep SAM-DETR's defaults; given flags stay
    raw = benchmark.parse_raw(["--device", "cpu", "--num_queries", "20"])
    assert benchmark.with_preset(raw, "dc5").num_queries == benchmark.with_preset(raw, preset).num_queries == 20
    assert benchmark.config_name(benchmark.with_preset(benchmark.parse_raw([]), "dc5")) == "dc5"


def test_detr_preset_refuses_sam_detr_flags():
    with pytest.raises(SystemExit, match="--configs detr: --smca"):
        benchmark.main(TINY_MODEL + ["--device", "cpu", "--mode", "flops", "--smca", "--configs", "detr"])


@pytest.mark.parametrize("flags, published", [([], "41M params, 86 GFLOPs"),
                                              (["--dilation"], "41M params, 187 GFLOPs")])
def test_detr_published_figures_beside_the_count(flags, published):
    args = parse(["--meta_arch", "detr"] + flags)
    row = {"config": benchmark.config_name(args), "gflops": 91.2, "gflops_by_op": {"conv": 91.2}, "uncounted": {},
           "trainable": 41_302_368}
    notes = benchmark.format_flop_notes([row], [args])
    assert f"DETR paper, Table 1: {published}" in notes and "41.3M trainable params, 91 GFLOPs" in notes


class _Ops(nn.Module):
    """Each special op once, on shapes small enough to count by hand."""

    def forward(self, q, k, v, feature, boxes):
        attn = F.scaled_dot_product_attention(q, k, v)
        rois = roi_align(feature, [boxes], output_size=7, spatial_scale=1.0, aligned=True)
        return attn, rois


def test_handles_count_by_their_rules():
    batch, heads, queries, keys, dq, dv = 2, 4, 5, 6, 8, 3
    q, k = torch.randn(batch, heads, queries, dq), torch.randn(batch, heads, keys, dq)
    v = torch.randn(batch, heads, keys, dv)
    channels, num_boxes, roi = 3, 2, 7
    feature = torch.randn(1, channels, 10, 10)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 2.0, 8.0, 9.0]])
    from fvcore.nn import FlopCountAnalysis
    analysis = FlopCountAnalysis(_Ops(), (q, k, v, feature, boxes)).set_op_handle(**benchmark.FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    by_op = analysis.by_operator()
    assert by_op["scaled_dot_product_attention"] == batch * heads * queries * keys * (dq + dv)
    assert by_op["roi_align"] == num_boxes * channels * roi * roi * benchmark.BILINEAR_MACS


def test_ms_deform_attn_rule():
    pytest.importorskip("models.ops")
    from models.ops import ms_deform_attn

    class Deform(nn.Module):
        def forward(self, value, shapes, starts, locations, weights):
            return ms_deform_attn(value, shapes, starts, locations, weights)

    n, q, m, d, p = 1, 5, 2, 4, 3
    shapes = torch.tensor([[4, 6], [2, 3]])
    starts = torch.tensor([0, 24])
    levels = len(shapes)
    value = torch.randn(n, int(shapes.prod(1).sum()), m, d)
    locations = torch.rand(n, q, m, levels, p, 2)
    weights = torch.rand(n, q, m, levels, p)
    from fvcore.nn import FlopCountAnalysis
    analysis = FlopCountAnalysis(Deform(), (value, shapes, starts, locations, weights))
    analysis.set_op_handle(**benchmark.FLOP_HANDLES).unsupported_ops_warnings(False)
    expected = n * q * m * levels * p * d * (benchmark.BILINEAR_MACS + benchmark.ATTENTION_WEIGHT_MACS)
    assert analysis.total() == expected


def test_tiny_speed_in_process():
    args = parse(TINY_MODEL + TINY_SPEED)
    for phase in ("inference", "train"):
        result = benchmark.measure_config(args, phase)
        assert result["seconds"] > 0 and math.isfinite(result["seconds"])
        assert result["images_per_s"] == pytest.approx(args.batch_size / result["seconds"])
        assert result["peak_mib"] >= 0


def test_table_for_three_configs_with_detr(capsys):
    rows = benchmark.main(TINY_MODEL + TINY_SPEED + ["--no_isolate", "--configs", "default", "smca", "detr"])
    printed = capsys.readouterr().out
    assert [r["config"] for r in rows] == ["default", "smca", "detr"]
    assert rows[2]["trainable"] < rows[0]["trainable"]  # DETR: no Semantics Aligner, fewer queries
    for row in rows:
        assert row["gflops"] > 0 and row["train"]["seconds"] > 0
        assert any(line.startswith(row["config"] + " ") for line in printed.splitlines())
    assert "GFLOPs by op" in printed


def test_isolated_measurement_runs_in_a_subprocess():
    args = parse(TINY_MODEL + TINY_SPEED)
    result = benchmark.measure_isolated(args, "inference")
    assert result["seconds"] > 0 and result["peak_mib"] >= 0


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown config"):
        benchmark.with_preset(parse([]), "nonsense")


# ----------------------------------------------------------------------------- the speed flags of main.py

TINY_TABLE = TINY_MODEL + TINY_SPEED + ["--no_isolate", "--mode", "speed"]
DIVISOR = 64
PADDED_WIDTH = 128  # SMALL_IMAGE's 96 rounded up to a multiple of DIVISOR (its 64 already is one)


def _record_inputs(monkeypatch):
    """Every model that benchmark.build makes appends the (B, C, H, W) shape and type of its input."""
    seen = []
    build = benchmark.build

    def recording_build(args):
        model, criterion = build(args)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        return model, criterion
    monkeypatch.setattr(benchmark, "build", recording_build)
    return seen


def test_size_divisibility_pads_the_batch_the_model_sees(monkeypatch, capsys):
    from util.misc import NestedTensor
    seen = _record_inputs(monkeypatch)
    benchmark.main(TINY_TABLE + ["--size_divisibility", str(DIVISOR)])
    assert seen, "the model was never called"
    for samples in seen:  # inference and train steps alike get the loader's padded NestedTensor
        assert isinstance(samples, NestedTensor)
        assert tuple(samples.tensors.shape) == (2, 3, 64, PADDED_WIDTH)
        assert samples.mask[:, :, 96:].all() and not samples.mask[:, :, :96].any()
    assert f"64 x 96 padded to 64 x {PADDED_WIDTH}" in capsys.readouterr().out


def test_compile_times_the_model_of_main_compile_model(monkeypatch, capsys):
    import main

    compiled = []

    def spy(model, size_divisibility):
        compiled.append((CallCounter(model), size_divisibility))
        return compiled[-1][0]
    monkeypatch.setattr(main, "compile_model", spy)
    benchmark.main(TINY_TABLE + ["--compile", "--size_divisibility", "32"])
    assert [divisor for _, divisor in compiled] == [32, 32]  # inference, then train
    # --warmup 0 is raised to one untimed run that absorbs the compilation, then the timed one
    assert [model.calls for model, _ in compiled] == [benchmark.COMPILE_WARMUP + 1] * 2
    header = capsys.readouterr().out
    assert "compile on" in header and f"after {benchmark.COMPILE_WARMUP} warm-up (compilation included)" in header
    assert "eager model" in header  # GFLOPs never count the compiled model


def test_amp_off_cuda_runs_float32_and_says_so(monkeypatch, capsys):
    import engine
    asked = []
    autocast_context = engine.autocast_context

    def spy(device, amp):
        asked.append(amp)
        return autocast_context(device, amp)
    monkeypatch.setattr(engine, "autocast_context", spy)
    rows = benchmark.main(TINY_TABLE + ["--amp", "fp16"])
    assert rows[0]["inference"]["seconds"] > 0 and rows[0]["train"]["seconds"] > 0
    # both steps ask engine's autocast for --amp, as evaluate and train_step do
    assert asked.count("fp16") >= 2 and set(asked) == {"fp16"}
    out = capsys.readouterr().out
    assert "--amp fp16 applies on CUDA (and bf16 on the CPU)" in out  # main.py's note
    assert "precision float32 (--amp fp16 applies on CUDA, and bf16 on the CPU)" in out  # the header: what ran


@pytest.mark.filterwarnings("ignore::UserWarning")  # autocast and GradScaler warn when CUDA is absent
@pytest.mark.parametrize("device, amp, name", [
    ("cpu", None, "float32"),
    ("cpu", "fp16", "float32 (--amp fp16 applies on CUDA, and bf16 on the CPU)"),
    ("cpu", "bf16", "bf16 autocast"),
    ("cuda", None, "float32"),
    ("cuda", "bf16", "bf16 autocast"),
    ("cuda", "fp16", "fp16 autocast with a gradient scaler"),
])
def test_precision_names(device, amp, name, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})  # a CPU with bfloat16 units
    assert benchmark.precision_name(torch.device(device), amp) == name


def test_precision_name_of_bf16_on_a_cpu_without_bf16_units(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    assert benchmark.precision_name(torch.device("cpu"), "bf16").startswith("float32 (--amp bf16: this CPU has no")


def test_ops_mode_pads_and_counts_the_eager_model(monkeypatch, capsys):
    import main
    monkeypatch.setattr(main, "compile_model", lambda *a: pytest.fail("ops mode compiled the model"))
    benchmark.main(TINY_MODEL + ["--device", "cpu", "--mode", "ops", "--compile", "--size_divisibility", "100"])
    out = capsys.readouterr().out
    assert "96 x 128 padded to 100 x 200" in out and "ops mode counts the eager model" in out
    assert "(batch 2, 100 x 200): inference" in out


def test_ops_mode_counts_detr(capsys):
    benchmark.main(TINY_MODEL + ["--device", "cpu", "--mode", "ops", "--meta_arch", "detr"])
    out = capsys.readouterr().out
    assert "detr: non-view ATen ops per step (batch 2, 96 x 128): inference" in out and "train" in out
