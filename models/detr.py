"""The original DETR (Carion et al., ECCV 2020), the baseline SAM-DETR is measured against.

Its numbers, module structure and state_dict names are those of facebookresearch/detr, so its
published checkpoints load with strict=True. It shares the backbone, the encoder's attention and
FFN, the matcher and criterion machinery, the box ops, the data and the engine with SAM-DETR. Its
own parts: learned query embeddings instead of reference boxes, a plain decoder whose final
LayerNorm is applied to every layer's output, one class head of num_classes + 1 logits (the last
is "no object") and one box MLP shared by all layers, the softmax criterion and matcher, and a
post-processor that returns every query with its best real class.
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy
from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .attention import split_heads
from .backbone import Joiner, build_backbone, channels_last_1x1_weights
from .criterion import SoftmaxSetCriterion
from .encoder import PackedSelfAttention, TransformerEncoder, TransformerEncoderLayer, key_padding_bias
from .matcher import SoftmaxHungarianMatcher, build_matcher
from .mlp import MLP, Dropout, FeedForward
from .position_encoding import DETR_PIXEL_OFFSET
from .sam_detr import DetectionPostProcess, default_num_classes, layer_outputs, loss_weights, to_pixels
from .transformer import clones, flatten_map

NO_OBJECT_LOGITS = 1  # the extra "no object" class
BOX_MLP_LAYERS = 3
BOX_DIM = 4


class DETREncoderLayer(TransformerEncoderLayer):
    """SAM-DETR's encoder layer, whose numbers are DETR's, with DETR's registration order
    (self_attn, linear1, linear2, norm1, norm2): the order of DETR's state dicts."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__(d_model, nhead, dim_feedforward, dropout)
        for name in ("norm1", "norm2"):  # re-registered after the FFN
            module = getattr(self, name)
            delattr(self, name)
            setattr(self, name, module)


class PackedCrossAttention(PackedSelfAttention):
    """Queries attending to a memory, with nn.MultiheadAttention's parameters: the rows of
    `in_proj_weight` project queries, keys and values in that order.

    The keys and values depend only on the memory, so the decoder projects them for all its
    layers at once (`project_memory`); `forward` takes them projected.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_bias: Tensor) -> Tensor:
        """query (B, Q, C), position included; key, value (B, S, C) projected; attn_bias
        (B, 1, 1, S) -> (B, Q, C)."""
        d_model = query.shape[-1]
        q = F.linear(query, self.in_proj_weight[:d_model], self.in_proj_bias[:d_model])
        h = self.nhead
        return self.attend(split_heads(q, h), split_heads(key, h), split_heads(value, h), attn_bias)


def project_memory(attns: Sequence[PackedCrossAttention], memory: Tensor, pos: Tensor) -> List[Tuple[Tensor, Tensor]]:
    """Cross-attention keys (of memory + pos) and values (of memory) of every layer, as two
    matmuls on the layers' concatenated weights instead of two per layer.

    memory, pos (B, S, C) -> per layer (key, value), each (B, S, C).
    """
    c = memory.shape[-1]
    key_rows, value_rows = slice(c, 2 * c), slice(2 * c, 3 * c)
    keys = F.linear(memory + pos, torch.cat([a.in_proj_weight[key_rows] for a in attns]),
                    torch.cat([a.in_proj_bias[key_rows] for a in attns]))
    values = F.linear(memory, torch.cat([a.in_proj_weight[value_rows] for a in attns]),
                      torch.cat([a.in_proj_bias[value_rows] for a in attns]))
    return list(zip(keys.split(c, -1), values.split(c, -1)))


class DETRDecoderLayer(FeedForward):
    """DETR's post-norm decoder layer: self-attention of the queries, cross-attention to the
    memory (both with the learned query embedding added to queries and keys), FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = PackedSelfAttention(d_model, nhead, dropout)
        self.multihead_attn = PackedCrossAttention(d_model, nhead, dropout)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, key: Tensor, value: Tensor, attn_bias: Tensor) -> Tensor:
        """tgt, query_pos (B, Q, C); key, value (B, S, C) this layer's projected memory -> (B, Q, C)."""
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt + query_pos, tgt, None)))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(tgt + query_pos, key, value, attn_bias)))
        return self._ffn(tgt, self.norm3)


class DETRDecoder(nn.Module):
    """Decoder layers from zero targets; `norm` is applied to every layer's output (the next
    layer reads the output before it)."""

    def __init__(self, layers: List[DETRDecoderLayer], d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, memory: Tensor, pos: Tensor, attn_bias: Tensor, query_pos: Tensor) -> Tensor:
        """memory, pos (B, S, C); attn_bias (B, 1, 1, S); query_pos (B, Q, C) -> (L, B, Q, C)."""
        memory_kv = project_memory([layer.multihead_attn for layer in self.layers], memory, pos)
        tgt = torch.zeros_like(query_pos)
        hidden = []
        for layer, (key, value) in zip(self.layers, memory_kv):
            tgt = layer(tgt, query_pos, key, value, attn_bias)
            hidden.append(tgt)
        return self.norm(torch.stack(hidden))


class DETRTransformer(nn.Module):
    """DETR's encoder-decoder over the C5 map (post-norm, no final encoder norm)."""

    def __init__(self, d_model: int, nhead: int, num_encoder_layers: int, num_decoder_layers: int,
                 dim_feedforward: int, dropout: float):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"hidden_dim {d_model} must be divisible by nheads {nhead}")
        self.encoder = TransformerEncoder(clones(DETREncoderLayer(d_model, nhead, dim_feedforward, dropout),
                                                  num_encoder_layers))
        self.decoder = DETRDecoder(clones(DETRDecoderLayer(d_model, nhead, dim_feedforward, dropout),
                                           num_decoder_layers), d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.d_model, self.nhead = d_model, nhead

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor) -> Tensor:
        """src, pos_embed (B, C, H, W); mask (B, H, W) True on padding; query_embed (Q, C) ->
        decoder outputs (L, B, Q, C) after the final LayerNorm."""
        src, pos = flatten_map(src), flatten_map(pos_embed)
        key_padding_mask = mask.flatten(1)
        memory = self.encoder(src, pos, key_padding_mask)
        query_pos = query_embed[None].expand(src.shape[0], -1, -1)
        return self.decoder(memory, pos, key_padding_bias(key_padding_mask, memory.dtype), query_pos)


class DETR(nn.Module):
    """Backbone -> 1x1 input projection -> transformer -> one class head and one box MLP shared
    by all decoder layers."""

    def __init__(self, backbone: Joiner, transformer: DETRTransformer, num_classes: int, num_queries: int,
                 aux_loss: bool):
        super().__init__()
        d_model = transformer.d_model
        self.num_queries = num_queries
        # registered in DETR's order, which is its state dicts' order
        self.transformer = transformer
        self.class_embed = nn.Linear(d_model, num_classes + NO_OBJECT_LOGITS)
        self.bbox_embed = MLP(d_model, d_model, BOX_DIM, BOX_MLP_LAYERS)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.input_proj = channels_last_1x1_weights(nn.Conv2d(backbone.num_channels[-1], d_model, kernel_size=1))
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, samples: Union[NestedTensor, Sequence[Tensor], Tensor]) -> Dict:
        """samples: a NestedTensor, or (C, H, W) images of any sizes.

        Returns pred_logits (B, Q, num_classes + 1), pred_boxes (B, Q, 4) normalised cxcywh,
        and, with aux_loss, aux_outputs: the same pair for every earlier decoder layer.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(list(samples))
        feats, masks, pos = self.backbone(samples)
        hidden = self.transformer(self.input_proj(feats[-1]), masks[-1], self.query_embed.weight, pos[-1])
        return layer_outputs(self.class_embed(hidden), self.bbox_embed(hidden).sigmoid(), self.aux_loss)


class DETRPostProcess(DetectionPostProcess):
    """DETR's detections: every query, with the best of its real classes (softmax)."""

    def batched(self, logits: Tensor, boxes: Tensor, target_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """logits (B, Q, C + 1), boxes (B, Q, 4) cxcywh -> scores (B, Q), labels (B, Q), boxes
        (B, Q, 4) xyxy in pixels of target_sizes (B, 2) of (h, w), in query order."""
        scores, labels = logits.softmax(-1)[..., :-NO_OBJECT_LOGITS].max(-1)
        return scores, labels, to_pixels(box_cxcywh_to_xyxy(boxes), target_sizes)


def build(args):
    """(DETR, its criterion, {"bbox": DETRPostProcess}) from main.py's flags (DETR's defaults
    applied, see models.meta_arch)."""
    num_classes = default_num_classes(args)
    transformer = DETRTransformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                                  num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                                  dropout=args.dropout)
    model = DETR(build_backbone(args, pixel_offset=DETR_PIXEL_OFFSET), transformer, num_classes=num_classes,
                 num_queries=args.num_queries, aux_loss=args.aux_loss)
    criterion = SoftmaxSetCriterion(num_classes, matcher=build_matcher(args, SoftmaxHungarianMatcher),
                                    weight_dict=loss_weights(args), eos_coef=args.eos_coef)
    return model, criterion, {"bbox": DETRPostProcess()}
