"""Multi-head attention over inputs that are already projected."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .code_path import cpu_form, step_aside
from .mlp import dropout as mlp_dropout
from .record import Recordable, Recorder


class ProjectedAttention(Recordable, nn.Module):
    """Scaled dot-product attention whose q/k/v projections live outside; owns `out_proj` only.

    SAM-DETR projects queries and keys with separate content and position layers, and its
    cross-attention has one query per head of full model width, so the attention itself takes
    ready-made per-head tensors. The scale is 1/sqrt(query width per head), as in the official
    model: 1/sqrt(d_model / heads) for self-attention, 1/sqrt(d_model) for cross-attention.

    Record point (models/record.py): "weights", the (B, heads, Lq, S) attention weights that
    multiply the values.
    """

    def __init__(self, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """q (B, heads, Lq, Dq); k (B, heads, S, Dq), or (B, S, Dq) shared by all heads; v (B, heads, S, Dv).

        bias: additive float, broadcastable to (B, heads, Lq, S) (-inf where not to attend).
        Returns (B, Lq, heads * Dv) after `out_proj`.
        """
        dropout = self.dropout if self.training else 0.0
        if k.dim() == 3:
            out = shared_key_attention(q, k, v, bias, dropout, self.recorder)
        else:
            out = attention(q, k, v, bias, dropout, self.recorder)
        return self.out_proj(out.transpose(1, 2).flatten(2))


def attention_weights(q: Tensor, k: Tensor, bias: Optional[Tensor]) -> Tensor:
    """softmax(q k^T / sqrt(D) + bias): q (B, heads, Lq, D), k (B, heads, S, D) -> (B, heads, Lq, S)."""
    logits = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if bias is not None:
        logits = logits.add_(bias)
    return logits.softmax(-1)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout: float,
              record: Optional[Recorder] = None) -> Tensor:
    """F.scaled_dot_product_attention: q, k (B, heads, L, D), v (B, heads, S, Dv); bias additive,
    broadcastable to (B, heads, Lq, S) -> (B, heads, Lq, Dv).

    With dropout the CPU has no fused kernel and runs PyTorch's unfused math path, whose masks come
    from a slow Bernoulli generator and whose softmax guards fully masked rows with three more passes
    over the logits. There the same computation is written out with `mlp.dropout`'s masks (no row
    here is fully masked: keys are masked only on padding, and every image has pixels).

    record: a recorder (models/record.py) that is handed ("weights", the (B, heads, Lq, S) weights
    that multiply v). The fused kernel returns none, so then the written-out form runs on every
    device: the same output up to float rounding.
    """
    if record is not None:
        step_aside("fused attention", "a recorder asks for the attention weights, which "
                   "F.scaled_dot_product_attention does not return")
    if record is not None or (dropout > 0 and cpu_form(q)):
        weights = mlp_dropout(attention_weights(q, k, bias), dropout, training=dropout > 0)
        if record is not None:
            record("weights", weights)
        return torch.matmul(weights, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)


def shared_key_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout: float,
                         record: Optional[Recorder] = None) -> Tensor:
    """Attention where every head reads the same key (SAM-DETR's cross-attention).

    q (B, heads, Lq, D); k (B, S, D); v (B, heads, S, Dv); bias broadcastable to
    (B, heads, Lq, S) -> (B, heads, Lq, Dv). The logits of all heads come from one batched matmul
    against the key as it is, with the bias added in the same call, instead of repeating the key
    per head as fused attention kernels would. The weights are made here in any case, so a
    recorder (models/record.py) is handed ("weights", (B, heads, Lq, S)) at no change of numbers.
    """
    b, h, lq, d = q.shape
    q = q.reshape(b, h * lq, d)
    scale = d ** -0.5
    if q.dtype != torch.float32:
        # half precision: scaled before the product, whose logits would otherwise be rounded (and
        # overflow fp16) at sqrt(d) times their size; in float32 the scale stays inside the matmul
        q, scale = q * scale, 1.0
    if bias is None:
        logits = torch.bmm(q, k.transpose(1, 2))
        logits = logits if scale == 1.0 else logits.mul_(scale)
    else:
        if bias.shape[1] == 1 and bias.shape[2] == 1:
            bias = bias.flatten(1, 2)  # (B, 1, S): broadcast by baddbmm, not copied per head and query
        else:
            bias = bias.expand(b, h, lq, -1).reshape(b, h * lq, k.shape[1])
        if bias.dtype == torch.float32 and q.dtype != torch.float32:
            # mixed precision: SMCA's log-prior reaches hundreds, where bfloat16 steps by one or more, so
            # it is added to float32 logits (autocast would round it into baddbmm's half precision)
            logits = torch.bmm(q, k.transpose(1, 2)).float().add_(bias)
        else:
            logits = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    attn = mlp_dropout(logits.softmax(-1), dropout, training=dropout > 0).view(b, h, lq, -1)
    if record is not None:
        record("weights", attn)
    return torch.matmul(attn.to(v.dtype), v)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, heads * D) -> (B, heads, L, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)
