"""Builds models the way the parity fixtures were made: the official flags, then every tensor of
the state dict filled from its own name (the rule in tests/fixtures/README.md)."""
import math
import zlib
from pathlib import Path

import torch

from main import get_args_parser
from models import build_model

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = ("default", "smca_e12", "ms_smca", "dc5_smca")
DETR_CONFIGS = ("detr_r50", "detr_dc5")  # the original DETR, computed by DETR's own code


def rule_value(name: str, shape) -> torch.Tensor:
    """Deterministic float32 values for the state-dict entry `name` of `shape`."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    r = torch.randn(shape, generator=gen, dtype=torch.float64)
    if name.endswith("running_var"):
        value = 1 + 0.1 * r.abs()
    elif len(shape) <= 1:
        value = 1 + 0.1 * r if name.endswith("weight") else 0.1 * r
    else:
        value = r / math.sqrt(math.prod(shape[1:]))
    return value.float()


@torch.no_grad()
def fill_by_rule(model: torch.nn.Module) -> torch.nn.Module:
    # state_dict order matters: a tensor shared under two names ends with the later name's values
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(rule_value(name, tuple(tensor.shape)))
    return model


def load_fixture(config: str) -> dict:
    return torch.load(FIXTURES / f"{config}.pt", weights_only=True)


def parse_args(flags):
    return get_args_parser().parse_args(list(flags) + ["--no_pretrained_backbone", "--device", "cpu"])


def build_filled(flags):
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(parse_args(flags))
    return fill_by_rule(model), criterion, postprocessors
