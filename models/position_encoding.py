"""Sine position encodings: of a padded feature map, and of normalised points."""
import math

import torch
from torch import Tensor, nn

TEMPERATURE = 10000.0
TWO_PI = 2 * math.pi


def frequencies(num_feats: int, temperature: float = TEMPERATURE) -> Tensor:
    """(num_feats,) divisors; features 2i and 2i+1 share one frequency (sin and cos)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def sine_cosine(angles: Tensor) -> Tensor:
    """(..., F) angles -> (..., F): sin of the even features and cos of the odd ones, interleaved."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


# SAM-DETR centres each coordinate on its pixel: the running count of valid pixels minus a half,
# divided by the valid extent plus a half. DETR uses the plain count and extent.
SAM_DETR_PIXEL_OFFSET = 0.5
DETR_PIXEL_OFFSET = 0.0


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised 2-D sine encoding of a padded feature map.

    Coordinates are the running count of valid pixels, minus `pixel_offset`, divided by the
    valid extent plus `pixel_offset` and scaled to [0, 2*pi]. The official SAM-DETR centres them
    on each pixel (SAM_DETR_PIXEL_OFFSET), DETR does not (DETR_PIXEL_OFFSET).
    """

    def __init__(self, num_pos_feats: int, temperature: float = TEMPERATURE, scale: float = TWO_PI,
                 pixel_offset: float = SAM_DETR_PIXEL_OFFSET):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.pixel_offset = pixel_offset
        # a constant, kept out of the state dict (official checkpoints have no such entry)
        self.register_buffer("dim_t", frequencies(num_pos_feats, temperature), persistent=False)

    def forward(self, mask: Tensor) -> Tensor:
        """mask (B, H, W), True on padding -> (B, 2 * num_pos_feats, H, W), y features first."""
        eps = 1e-6
        not_mask = ~mask
        offset = self.pixel_offset
        y = not_mask.cumsum(1, dtype=torch.float32) - offset
        x = not_mask.cumsum(2, dtype=torch.float32) - offset
        y = y / (y[:, -1:, :] + eps + offset) * self.scale
        x = x / (x[:, :, -1:] + eps + offset) * self.scale
        angles = torch.stack((y, x), dim=-1)[..., None] / self.dim_t  # (B, H, W, 2, F)
        return sine_cosine(angles).flatten(-2).permute(0, 3, 1, 2)


class PointSineEmbedding(nn.Module):
    """Sine encoding of normalised (x, y) points: (..., 2) -> (..., d_model), y features first.

    Computed without gradient on purpose: the official model lets no gradient flow through the
    query position encodings, including those of the sampled salient points.
    """

    def __init__(self, d_model: int, temperature: float = TEMPERATURE):
        super().__init__()
        self.register_buffer("dim_t", frequencies(d_model // 2, temperature), persistent=False)

    @torch.no_grad()
    def forward(self, points: Tensor) -> Tensor:
        angles = (points.flip(-1)[..., None] * TWO_PI) / self.dim_t  # (..., 2 as (y, x), d_model / 2)
        return sine_cosine(angles).flatten(-2)
