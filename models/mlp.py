"""A plain multi-layer perceptron, as DETR uses it for box heads and position projections."""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .code_path import cpu_form


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last). Works on any leading shape."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims: List[int] = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class Dropout(nn.Dropout):
    """nn.Dropout as `dropout` below: one fused op on a GPU, uniform draws on the CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Zeroes each element with probability p and scales the rest by 1 / (1 - p).

    F.dropout takes the fused `native_dropout` kernel on CUDA but four separate ops on the CPU,
    so the GPU gets that kernel directly. On the CPU both draw their masks from a Bernoulli
    generator several times slower than uniform draws, so there the mask is `rand >= p`: the
    same distribution, and with a boolean mask and `where`, a third of native_dropout's time
    forward and backward.
    """
    if not training or p == 0:
        return x
    if cpu_form(x):
        keep = torch.rand_like(x) >= p
        return torch.where(keep, x, 0.0).mul_(1.0 / (1.0 - p))
    return torch.native_dropout(x, p, True)[0]


class FeedForward(nn.Module):
    """Base of the layers that end with the post-norm FFN block.

    It registers `linear1`/`linear2` on the layer itself, keeping the official parameter names;
    the layer registers its own final norm (named differently in encoder and decoder).
    """

    def _init_ffn(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.ffn_dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.ffn_out_dropout = Dropout(dropout)

    def _ffn(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        y = self.linear2(self.ffn_dropout(F.relu(self.linear1(x))))
        return norm(x + self.ffn_out_dropout(y))
