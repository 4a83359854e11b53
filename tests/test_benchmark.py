"""tools/benchmark.py: official parameter counts, FLOP handles, and a tiny speed run."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

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


def test_table_for_two_configs(capsys):
    rows = benchmark.main(TINY_MODEL + TINY_SPEED + ["--no_isolate", "--configs", "default", "smca"])
    printed = capsys.readouterr().out
    assert [r["config"] for r in rows] == ["default", "smca"]
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
