"""Multi-head attention over inputs that are already projected."""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn


class ProjectedAttention(nn.Module):
    """Scaled dot-product attention whose q/k/v projections live outside; owns `out_proj` only.

    SAM-DETR projects queries and keys with separate content and position layers, and its
    cross-attention has one query per head of full model width, so the attention itself takes
    ready-made per-head tensors. The scale is 1/sqrt(query width per head), as in the official
    model: 1/sqrt(d_model / heads) for self-attention, 1/sqrt(d_model) for cross-attention.
    """

    def __init__(self, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """q (B, heads, Lq, Dq); k (B, heads or 1, S, Dq); v (B, heads, S, Dv).

        mask: boolean (True = attend) or additive float, broadcastable to (B, heads, Lq, S).
        Returns (B, Lq, heads * Dv) after `out_proj`.
        """
        if k.shape[1] != q.shape[1]:
            k = k.expand(-1, q.shape[1], -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, heads * D) -> (B, heads, L, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)
