"""The SAM-DETR decoder: Semantics Aligner, conditional cross-attention, optional SMCA prior.

`AlignerOptions` holds the paper's ablation switches (the Semantics Aligner off, pooled instead of
salient-point resampling, fewer salient points, no reweighting, points searched over the whole
image); its default is the official model.
"""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy
from util.misc import unbind

from .attention import ProjectedAttention, split_heads
from .code_path import all_plain, is_plain, step_aside
from .mlp import MLP, Dropout, FeedForward
from .position_encoding import PointSineEmbedding
from .record import Recordable
from .roi import ROI_FORMS, align_rois, pool

ROI_SIZE = 7                        # RoIAlign output side inside each reference box
POINT_CHANNEL_REDUCTION = 4         # point1 maps d_model -> d_model // 4 channels
POINT_MLP_HIDDEN = (256, 512, 512)  # widths of point2's hidden layers (fixed, not d_model)
SMCA_BANDWIDTH = 8.0                # divisor of the Gaussian log-prior, the value SMCA-DETR uses
XY = 2                              # coordinates per point
RESAMPLE_MODES = ("salient", "avgpool", "maxpool")  # how the Semantics Aligner makes the new query
SEARCH_REGIONS = ("box", "image")   # where the salient points may lie


@dataclass(frozen=True)
class AlignerOptions:
    """The Semantics Aligner's ablation switches (the paper's Section 4.3); the defaults are the
    official model.

    enabled: False removes the aligner (--no_sam): each layer's cross-attention query is its content
        plus the sine embedding of its reference-box centre, split across heads as in DETR.
    resample: "salient" samples the RoI at predicted points; "avgpool" / "maxpool" take the mean /
        max of the ROI_SIZE x ROI_SIZE RoI features as every head's content, at the box centre.
    points: salient points per query (None: one per head); each serves nheads / points heads.
    reweight: the sigmoid gates (attn1, attn2) on content and position.
    search: "box" keeps the salient points inside the reference box; "image" lets them lie
        anywhere in the image (sampled from the whole map).
    """
    enabled: bool = True
    resample: str = "salient"
    points: Optional[int] = None
    reweight: bool = True
    search: str = "box"

    @property
    def salient(self) -> bool:
        """Whether point1 / point2 predict salient points."""
        return self.enabled and self.resample == "salient"

    def num_points(self, nhead: int) -> int:
        return self.points or nhead

    def problems(self, nhead: int, smca: bool) -> List[str]:
        """What makes this combination impossible, in terms of the command-line flags."""
        if self.resample not in RESAMPLE_MODES:
            return [f"--sam_resample must be one of {', '.join(RESAMPLE_MODES)}, got {self.resample!r}"]
        if self.search not in SEARCH_REGIONS:
            return [f"--sam_search must be one of {', '.join(SEARCH_REGIONS)}, got {self.search!r}"]
        changed = [flag for flag, on in (("--sam_resample", self.resample != "salient"),
                                         ("--sam_points", self.points is not None),
                                         ("--no_sam_reweight", not self.reweight),
                                         ("--sam_search", self.search != "box")) if on]
        if not self.enabled:
            verb = "configures" if len(changed) == 1 else "configure"
            found = [f"{', '.join(changed)} {verb} the Semantics Aligner, which --no_sam removes"] if changed else []
            if smca:
                found.append("--smca centres its Gaussian prior on the salient points and takes their scales from "
                             "point2, which --no_sam removes")
            return found
        if self.resample != "salient":
            pooled = f"--sam_resample {self.resample}"
            found = [f"{flag} needs salient points, which {pooled} replaces" for flag in changed
                     if flag in ("--sam_points", "--sam_search")]
            if smca:
                found.append(f"--smca centres its Gaussian prior on the salient points, which {pooled} replaces")
            return found
        if self.points is not None and (self.points < 1 or nhead % self.points):
            return [f"--sam_points {self.points} must divide --nheads {nhead} (each point serves the same number "
                    f"of heads)"]
        return []

    def check(self, nhead: int, smca: bool) -> None:
        found = self.problems(nhead, smca)
        if found:
            raise ValueError("; ".join(found))


class FeatureMap(NamedTuple):
    """One encoded feature level as the decoder reads it (batch first), with the per-level
    constants every decoder layer needs, built once.

    memory, pos: (B, H*W, C); memory_2d: (B, C, H, W);
    attn_bias: (B, 1, 1, H*W), 0 on pixels and -inf on padding;
    valid_ratio: (B, 2) as (w, h), the unpadded fraction of the map;
    point_scale: (B, 1, 1, 2) = (W, H) * valid_ratio, normalised points -> feature pixels;
    box_scale: (B, 1, 4), the same for xyxy boxes;
    cells (H + W,): pixel centres i + 0.5, enough for the map's columns and for its rows.
    """
    memory: Tensor
    memory_2d: Tensor
    pos: Tensor
    attn_bias: Tensor
    valid_ratio: Tensor
    point_scale: Tensor
    box_scale: Tensor
    cells: Tensor

    @property
    def height(self) -> int:
        return self.memory_2d.shape[-2]

    @property
    def width(self) -> int:
        return self.memory_2d.shape[-1]


def valid_ratio(mask: Tensor) -> Tensor:
    """(B, H, W) padding mask -> (B, 2): valid fraction of width and height."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w / w, valid_h / h], -1).float()


def make_feature_map(memory: Tensor, pos: Tensor, mask: Tensor) -> FeatureMap:
    """memory, pos (B, H*W, C) and mask (B, H, W) -> FeatureMap.

    Everything here is made from shapes and device tensors: no tensor is built from host
    values, which on a GPU would be a copy the host waits for.
    """
    b, h, w = mask.shape
    memory_2d = memory.transpose(1, 2).reshape(b, -1, h, w).contiguous()
    ratio = valid_ratio(mask)
    attn_bias = torch.zeros(mask.shape, dtype=memory.dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    point_scale = torch.stack([ratio[:, 0] * w, ratio[:, 1] * h], -1)[:, None]
    # at least float32: under autocast the memory is half precision, which cannot hold x.5 past 256
    cell_dtype = torch.promote_types(memory.dtype, torch.float32)
    # H + W rather than max(H, W): a comparison of the sides would fix their order when traced
    cells = torch.arange(h + w, device=memory.device, dtype=cell_dtype) + 0.5
    return FeatureMap(memory, memory_2d, pos, attn_bias.view(b, 1, 1, h * w), ratio,
                      point_scale[:, None], point_scale.repeat(1, 1, 2), cells)


def smca_log_prior(points_px: Tensor, scales: Tensor, cells: Tensor, height: int, width: int) -> Tensor:
    """SMCA's Gaussian log-prior around each head's point, added to the attention logits.

    points_px (B, Q, heads, 2) in feature pixels; scales (B, Q, heads, 2); cells (N,) pixel
    centres i + 0.5 with N >= H, W -> (B, heads, Q, H*W): -(sx^2 (px - cx)^2 + sy^2 (py - cy)^2) / 8. The x and y
    terms are separable, so they are built per column and per row and broadcast, never as a
    (Q, H*W, B*heads, 2) tensor.
    """
    # both coordinates against one table of centres (at least as long as either side), then cut
    sq = (points_px.permute(0, 2, 1, 3)[..., None] - cells) ** 2 * (scales.permute(0, 2, 1, 3) ** 2)[..., None]
    dx, dy = sq[..., 0, :width], sq[..., 1, :height]
    return ((dx[..., None, :] + dy[..., :, None]) / -SMCA_BANDWIDTH).flatten(-2)


def fused_linear(x: Tensor, linears: Sequence[nn.Linear]) -> List[Tensor]:
    """[m(x) for m in linears] as one matmul on concatenated weights (the same dot products).

    Only worth it when the weights take gradients (one weight-gradient matmul instead of
    several); without autograd the concatenation would be an extra op, so each runs alone, as
    does any module that is not a plain nn.Linear or has hooks (see code_path.is_plain).
    """
    if not torch.is_grad_enabled():
        return [m(x) for m in linears]
    if not all_plain(linears, nn.Linear):
        step_aside("fused linear layers", "a layer is not a plain nn.Linear or has hooks")
        return [m(x) for m in linears]
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears])
    return list(F.linear(x, weight, bias).split([m.out_features for m in linears], -1))


def is_official_point1(point1: nn.Module) -> bool:
    """point1 is the official Sequential(1x1 Conv2d, ReLU), none of them hooked."""
    if not (is_plain(point1, nn.Sequential) and len(point1) == 2):
        return False
    conv, relu = point1
    return (is_plain(conv, nn.Conv2d) and is_plain(relu, nn.ReLU) and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1)


def sample_map(level: FeatureMap, points: Tensor) -> Tensor:
    """Bilinear samples of the whole map: points (B, Q, P, 2) normalised to the image -> (B, Q, P, C)."""
    grid = points * level.valid_ratio[:, None, None] * 2 - 1  # the image is the map's unpadded part
    sampled = F.grid_sample(level.memory_2d, grid, padding_mode="zeros", align_corners=False)
    return sampled.permute(0, 2, 3, 1)


def per_head(x: Optional[Tensor], nhead: int) -> Optional[Tensor]:
    """(B, Q, P, D) with P dividing nhead -> (B, Q, nhead, D): point p serves heads p*nhead/P onwards."""
    if x is None or x.shape[2] == nhead:
        return x
    return x.repeat_interleave(nhead // x.shape[2], dim=2)


class SAMDecoderLayer(Recordable, FeedForward):
    """One SAM-DETR decoder layer: self-attention, Semantics Aligner, cross-attention, FFN.

    The Semantics Aligner RoIAligns the encoded map inside each reference box, predicts one
    salient point per head from it, and re-samples the query content there; content and the
    point's position encoding are then reweighted per head by sigmoid gates from the query.
    `aligner` switches parts of this off for the paper's ablations (see AlignerOptions); the
    modules a variant does not use are not built.

    Record points (models/record.py; tools/visualize.py draws them), B images and Q queries:
    "boxes" (B, Q, 4) the reference boxes, normalised cxcywh; "map_size" (H, W) and "valid_ratio"
    (B, 2) of the level read; with the aligner "roi_boxes" (B, Q, 4) the RoIs, xyxy in feature
    pixels, "box_scale" (B, 1, 4) feature pixels per normalised unit, "points" (B, Q, heads, 2)
    each head's position, normalised to the image (the salient point, or with pooling the box
    centre), "scales" (B, Q, heads, 2) SMCA's (--smca) and "smca_prior" (B, heads, Q, H*W) its
    log-prior; the attention weights are `cross_attn`'s record point.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, smca: bool,
                 roi_align: str = "auto", aligner: AlignerOptions = AlignerOptions()):
        """roi_align: how the Semantics Aligner reads its RoIs, one of models.roi.ROI_FORMS
        (torchvision's kernel, the separable matmul form, or auto: by device and map size)."""
        super().__init__()
        if roi_align not in ROI_FORMS:
            raise ValueError(f"roi_align must be one of {ROI_FORMS}, got {roi_align!r}")
        aligner.check(nhead, smca)
        self.roi_align = roi_align
        if d_model % nhead or d_model % POINT_CHANNEL_REDUCTION or d_model % XY:
            raise ValueError(f"hidden_dim {d_model} must be divisible by nheads ({nhead}), "
                             f"by {POINT_CHANNEL_REDUCTION} and by 2")
        self.d_model, self.nhead, self.smca, self.aligner = d_model, nhead, smca, aligner
        self.num_points = aligner.num_points(nhead)
        # self-attention over content + position projections of the queries
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = ProjectedAttention(d_model, dropout)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        # cross-attention with one full-width query per head
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = MLP(d_model, d_model, d_model, 2)
        self.ca_kpos_sine_proj = MLP(d_model, d_model, d_model, 2)
        self.cross_attn = ProjectedAttention(d_model, dropout)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        if aligner.salient:
            self._init_point_heads(d_model)
        if aligner.enabled and aligner.reweight:
            self.attn1 = nn.Linear(d_model, d_model * nhead)
            self.attn2 = nn.Linear(d_model, d_model * nhead)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.point_pos_embed = PointSineEmbedding(d_model)

    def _init_point_heads(self, d_model: int) -> None:
        """Semantics Aligner: salient points from the RoI features (with SMCA also a scale per point)."""
        point_channels = d_model // POINT_CHANNEL_REDUCTION
        self.point1 = nn.Sequential(nn.Conv2d(d_model, point_channels, kernel_size=1), nn.ReLU())
        point_outputs = self.num_points * XY * (2 if self.smca else 1)
        dims = (point_channels * ROI_SIZE * ROI_SIZE,) + POINT_MLP_HIDDEN
        mlp: List[nn.Module] = []
        for i, o in zip(dims[:-1], dims[1:]):
            mlp += [nn.Linear(i, o), nn.ReLU()]
        self.point2 = nn.Sequential(*mlp, nn.Linear(dims[-1], point_outputs))
        nn.init.zeros_(self.point2[-1].weight)
        nn.init.zeros_(self.point2[-1].bias)

    def _self_attention(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q_content, k_content, v = fused_linear(tgt, (self.sa_qcontent_proj, self.sa_kcontent_proj, self.sa_v_proj))
        q_pos, k_pos = fused_linear(query_pos, (self.sa_qpos_proj, self.sa_kpos_proj))
        q, k = q_content + q_pos, k_content + k_pos
        h = self.nhead
        out = self.self_attn(split_heads(q, h), split_heads(k, h), split_heads(v, h))
        return self.norm1(tgt + self.dropout1(out))

    def _point_features(self, rois) -> Tensor:
        """point1 on the RoIs -> (B*Q, C', S, S). The RoI form may apply a plain 1x1 convolution
        without making the RoI tensor; anything else (a replaced or hooked module) is called as it is."""
        point1 = self.point1
        if is_official_point1(point1):
            return point1[1](rois.conv1x1(point1[0]))
        if rois.fast_conv:
            step_aside("Semantics Aligner point1", "point1 is not the official 1x1 convolution and ReLU, or has hooks")
        return point1(rois.tensor())

    def _align(self, level: FeatureMap, boxes: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The new query content from each reference box.

        boxes (B, Q, 4) normalised cxcywh -> features (B, Q, heads, C) sampled at the salient
        point of each head (or the pooled RoI), points (B, Q, heads, 2) normalised to the image,
        and SMCA scales (B, Q, heads, 2) or None.
        """
        b, q, _ = boxes.shape
        boxes_px = box_cxcywh_to_xyxy(boxes) * level.box_scale
        self.record("roi_boxes", boxes_px)
        self.record("box_scale", level.box_scale)
        rois = align_rois(level.memory, level.memory_2d, boxes_px, ROI_SIZE, self.roi_align)
        h = self.nhead
        if not self.aligner.salient:
            pooled = pool(rois.tensor(), self.aligner.resample).view(b, q, 1, -1)
            centres = boxes[:, :, None, :XY].expand(b, q, h, XY)
            self.record("points", centres)
            return pooled.expand(b, q, h, -1), centres, None
        raw = self.point2(self._point_features(rois).flatten(1))
        n = self.num_points
        raw_offsets, raw_scales = raw.split([n * XY, raw.shape[1] - n * XY], 1)
        offsets = raw_offsets.tanh().view(b, q, n, XY)
        if self.aligner.search == "box":
            features = rois.sample(offsets)
            points = torch.addcmul(boxes[:, :, None, :XY], boxes[:, :, None, XY:] * 0.5, offsets)
        else:
            points = (offsets + 1) * 0.5  # anywhere in the image
            features = sample_map(level, points)
        scales = raw_scales.view(b, q, n, XY) if self.smca else None
        points, scales = per_head(points, h), per_head(scales, h)
        self.record("points", points)
        if scales is not None:
            self.record("scales", scales)
        return per_head(features, h), points, scales

    def _cross_attention(self, tgt: Tensor, level: FeatureMap, key: Tensor, value: Tensor, content: Tensor,
                         points: Tensor, scales: Optional[Tensor]) -> Tensor:
        b, q, h, c = content.shape
        point_pos = self.point_pos_embed(points)
        if self.aligner.reweight:
            content_gate, pos_gate = (g.view(b, q, h, c).sigmoid() for g in fused_linear(tgt, (self.attn1, self.attn2)))
            content, point_pos = content * content_gate, point_pos * pos_gate
        query = self.ca_qcontent_proj(content) + self.ca_qpos_sine_proj(point_pos)
        bias = level.attn_bias
        if scales is not None:
            points_px = points * level.point_scale
            prior = smca_log_prior(points_px, scales, level.cells, level.height, level.width)
            self.record("smca_prior", prior)
            bias = prior.add_(bias)
        out = self.cross_attn(query.transpose(1, 2), key, split_heads(value, h), bias)
        return self.norm2(tgt + self.dropout2(out))

    def _box_cross_attention(self, tgt: Tensor, level: FeatureMap, key: Tensor, value: Tensor,
                             query_pos: Tensor) -> Tensor:
        """Without the Semantics Aligner: the content plus the box centre's sine embedding,
        split across heads with the key and value (multi-head attention as in DETR)."""
        query = self.ca_qcontent_proj(tgt) + self.ca_qpos_sine_proj(query_pos)
        h = self.nhead
        out = self.cross_attn(split_heads(query, h), split_heads(key, h), split_heads(value, h), level.attn_bias)
        return self.norm2(tgt + self.dropout2(out))

    def forward(self, tgt: Tensor, level: FeatureMap, boxes: Tensor, query_pos: Tensor,
                memory_kv: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """tgt (B, Q, C); boxes (B, Q, 4) reference boxes, normalised cxcywh; query_pos (B, Q, C)
        sine encoding of the box centres; memory_kv: this layer's cross-attention key and value
        of `level` when already computed (see `project_memory`) -> (B, Q, C)."""
        key, value = memory_kv if memory_kv is not None else project_memory([self], level)[0]
        self.record("boxes", boxes)
        self.record("map_size", (level.height, level.width))
        self.record("valid_ratio", level.valid_ratio)
        tgt = self._self_attention(tgt, query_pos)
        if self.aligner.enabled:
            content, points, scales = self._align(level, boxes)
            tgt = self._cross_attention(tgt, level, key, value, content, points, scales)
        else:
            tgt = self._box_cross_attention(tgt, level, key, value, query_pos)
        return self._ffn(tgt, self.norm3)


def _projects_plainly(layer: SAMDecoderLayer) -> bool:
    """Whether project_memory may read this layer's key and value projections as weights."""
    mlp = layer.ca_kpos_sine_proj
    return (is_plain(layer.ca_kcontent_proj, nn.Linear) and is_plain(layer.ca_v_proj, nn.Linear)
            and is_plain(mlp, MLP) and len(mlp.layers) == 2 and all_plain(mlp.layers, nn.Linear))


def project_memory(layers: Sequence[SAMDecoderLayer], level: FeatureMap) -> List[Tuple[Tensor, Tensor]]:
    """Cross-attention key and value of `level` for each of `layers`, all in one pass.

    key = ca_kcontent_proj(memory) + ca_kpos_sine_proj(pos) and value = ca_v_proj(memory) do not
    depend on the queries, so the layers that read the same level get theirs from three matmuls
    on concatenated weights (the last MLP layer as one batched matmul) instead of six each.
    Layers whose projections are replaced or hooked are computed by calling the modules.
    Returns per layer (key, value), each (B, H*W, C) (views into shared buffers).
    """
    if not all(_projects_plainly(l) for l in layers):
        step_aside("decoder key/value projections", "ca_kcontent_proj, ca_v_proj or ca_kpos_sine_proj is "
                   "not the plain module or has hooks")
        return [(l.ca_kcontent_proj(level.memory) + l.ca_kpos_sine_proj(level.pos), l.ca_v_proj(level.memory))
                for l in layers]
    n = len(layers)
    b, tokens, c = level.memory.shape
    content_value = F.linear(level.memory,
                             torch.cat([l.ca_kcontent_proj.weight for l in layers] + [l.ca_v_proj.weight for l in layers]),
                             torch.cat([l.ca_kcontent_proj.bias for l in layers] + [l.ca_v_proj.bias for l in layers]))
    first = [l.ca_kpos_sine_proj.layers[0] for l in layers]
    last = [l.ca_kpos_sine_proj.layers[1] for l in layers]
    hidden = F.relu(F.linear(level.pos, torch.cat([m.weight for m in first]), torch.cat([m.bias for m in first])))
    key_pos = torch.baddbmm(torch.stack([m.bias for m in last])[:, None], hidden.view(b * tokens, n, c).transpose(0, 1),
                            torch.stack([m.weight for m in last]).transpose(1, 2))  # (n, B*HW, C)
    # split/unbind rather than slicing: their backward is one op, not one padded copy per piece
    content, value = content_value.split(n * c, -1)
    keys = content.view(b, tokens, n, c) + key_pos.view(n, b, tokens, c).permute(1, 2, 0, 3)
    return list(zip(unbind(keys, 2), unbind(value.view(b, tokens, n, c), 2)))


class DecoderOutput(NamedTuple):
    """Per decoder layer (stacked on dim 0): hidden states (L, B, Q, C), the reference boxes it
    used (L, B, Q, 4, sigmoid space) and its predicted box deltas (L, B, Q, 4, logit space)."""
    hidden: Tensor
    references: Tensor
    box_deltas: Tensor


class SAMDecoder(nn.Module):
    """Decoder layers with iterative reference-box refinement.

    Owns `bbox_embed` (one box MLP per layer, shared with the detection head): layer i's box
    delta gives both its output box and, detached, layer i+1's reference.
    """

    def __init__(self, layers: List[SAMDecoderLayer], bbox_embed: nn.ModuleList,
                 level_of_layer: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.bbox_embed = bbox_embed
        self.level_of_layer = tuple(level_of_layer)
        self.query_pos_embed = PointSineEmbedding(self.layers[0].d_model)

    def forward(self, levels: List[FeatureMap], query_boxes: Tensor) -> DecoderOutput:
        """levels: encoded maps; query_boxes (Q, 4) learnt reference boxes, pre-sigmoid cxcywh."""
        batch = levels[0].memory.shape[0]
        d_model = levels[0].memory.shape[-1]
        boxes_logit = query_boxes[None].expand(batch, -1, -1)
        tgt = levels[0].memory.new_zeros(batch, query_boxes.shape[0], d_model)
        hidden, references, deltas = [], [], []
        memory_kv = self._project_levels(levels)
        for i, layer in enumerate(self.layers):
            if i > 0:
                # refine from the previous layer's prediction, but let no gradient through it
                boxes_logit = (deltas[-1] + boxes_logit).detach()
            boxes = boxes_logit.sigmoid()
            query_pos = self.query_pos_embed(boxes[..., :XY])
            tgt = layer(tgt, levels[self.level_of_layer[i]], boxes, query_pos, memory_kv[i])
            hidden.append(tgt)
            references.append(boxes)
            deltas.append(self.bbox_embed[i](tgt))
        return DecoderOutput(torch.stack(hidden), torch.stack(references), torch.stack(deltas))

    def _project_levels(self, levels: List[FeatureMap]) -> List[Tuple[Tensor, Tensor]]:
        """(key, value) of every layer, computed together for the layers that share a level."""
        memory_kv: List[Tuple[Tensor, Tensor]] = [None] * len(self.layers)  # type: ignore[list-item]
        for lvl in sorted(set(self.level_of_layer)):
            idx = [i for i, l in enumerate(self.level_of_layer) if l == lvl]
            for i, kv in zip(idx, project_memory([self.layers[i] for i in idx], levels[lvl])):
                memory_kv[i] = kv
        return memory_kv
