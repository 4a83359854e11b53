"""Encoder + SAM decoder over one (C5) or several (C3-C5) feature levels."""
import copy
import itertools
from typing import List

import numpy as np
import torch
from torch import Tensor, nn

from util.misc import to_device_async

from .decoder import (AlignerOptions, DecoderOutput, FeatureMap, SAMDecoder, SAMDecoderLayer, make_feature_map,
                      valid_ratio)
from .encoder import (DeformableTransformerEncoder, DeformableTransformerEncoderLayer,
                      TransformerEncoder, TransformerEncoderLayer)
from .mlp import MLP
from .ops import MSDeformAttn
from .ops.shapes import LevelShapes

MULTISCALE_LEVELS = 3   # C3, C4, C5
DEFORMABLE_POINTS = 4   # sampling points per head and level in the deformable encoder
BOX_MLP_LAYERS = 3
BOX_DIM = 4


def decoder_levels(num_layers: int, num_levels: int) -> List[int]:
    """Feature level each decoder layer reads: coarse to fine in equal runs.

    With 6 layers and 3 levels this is the official map [2, 2, 1, 1, 0, 0]: layers 0-1 read
    stride 32, layers 2-3 stride 16, layers 4-5 stride 8.
    """
    return [num_levels - 1 - (i * num_levels) // num_layers for i in range(num_layers)]


class Transformer(nn.Module):
    def __init__(self, d_model: int, nhead: int, num_encoder_layers: int, num_decoder_layers: int,
                 dim_feedforward: int, dropout: float, smca: bool, multiscale: bool, roi_align: str = "auto",
                 aligner: AlignerOptions = AlignerOptions()):
        """aligner: the Semantics Aligner's ablation switches (default: the official model)."""
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"hidden_dim {d_model} must be divisible by nheads {nhead}")
        self.d_model = d_model
        self.multiscale = multiscale
        num_levels = MULTISCALE_LEVELS if multiscale else 1
        if multiscale:
            # the official multi-scale encoder halves the FFN width to save memory
            enc_layer = DeformableTransformerEncoderLayer(
                d_model, nhead, dim_feedforward // 2, dropout, n_levels=num_levels, n_points=DEFORMABLE_POINTS)
            self.encoder = DeformableTransformerEncoder(clones(enc_layer, num_encoder_layers))
            self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        else:
            enc_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout)
            self.encoder = TransformerEncoder(clones(enc_layer, num_encoder_layers))
        dec_layer = SAMDecoderLayer(d_model, nhead, dim_feedforward, dropout, smca, roi_align, aligner)
        self._reset_parameters()
        box_head = MLP(d_model, d_model, BOX_DIM, BOX_MLP_LAYERS)
        # zero box deltas at start: the first predictions are the learnt reference boxes
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        self.decoder = SAMDecoder(clones(dec_layer, num_decoder_layers),
                                  nn.ModuleList(clones(box_head, num_decoder_layers)),
                                  decoder_levels(num_decoder_layers, num_levels))
        self._reset_decoder_layers()

    def _reset_parameters(self) -> None:
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.encoder.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if self.multiscale:
            nn.init.normal_(self.level_embed)

    def _reset_decoder_layers(self) -> None:
        # The official model re-initialises every matrix of its decoder layers with Xavier after
        # building them, which also overrides the zero init of point2's last weight (its bias
        # stays zero). The box heads are attached later and keep their zero init.
        for p in self.decoder.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor],
                query_boxes: Tensor) -> DecoderOutput:
        """srcs, pos_embeds (B, d_model, H_l, W_l); masks (B, H_l, W_l); query_boxes (Q, 4)."""
        if self.multiscale:
            levels = self._encode_multiscale(srcs, masks, pos_embeds)
        else:
            src, pos = flatten_map(srcs[0]), flatten_map(pos_embeds[0])
            memory = self.encoder(src, pos, masks[0].flatten(1))
            levels = [make_feature_map(memory, pos, masks[0])]
        return self.decoder(levels, query_boxes)

    def _encode_multiscale(self, srcs: List[Tensor], masks: List[Tensor],
                           pos_embeds: List[Tensor]) -> List[FeatureMap]:
        pos = [flatten_map(p) + self.level_embed[lvl] for lvl, p in enumerate(pos_embeds)]
        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        sizes = [h * w for h, w in shapes]
        levels = len(shapes)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            # traced: the sizes stay Python (symbolic) ints and deformable attention takes its
            # traceable path (see ops/shapes.py)
            spatial_shapes, starts = shapes, None
        else:
            # one non-blocking upload of both tables (a pageable copy would make the host wait)
            starts = [0] + list(itertools.accumulate(sizes))[:-1]
            tables = to_device_async(np.asarray([*itertools.chain(*shapes), *starts], dtype=np.int64),
                                     srcs[0].device)
            spatial_shapes, starts = LevelShapes(shapes, tables[: 2 * levels].view(levels, 2)), tables[2 * levels:]
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        memory = self.encoder(torch.cat([flatten_map(s) for s in srcs], 1), torch.cat(pos, 1), shapes, spatial_shapes,
                              starts, valid_ratios, torch.cat([m.flatten(1) for m in masks], 1))
        return [make_feature_map(mem, p, m) for mem, p, m in zip(memory.split(sizes, 1), pos, masks)]


def flatten_map(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def clones(module: nn.Module, n: int) -> List[nn.Module]:
    # layers start as copies of one initialised layer, as in DETR
    return [copy.deepcopy(module) for _ in range(n)]


def build_transformer(args) -> Transformer:
    return Transformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                       num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                       dropout=args.dropout, smca=args.smca, multiscale=args.multiscale,
                       roi_align=args.roi_align, aligner=build_aligner_options(args))


# the command-line flags of AlignerOptions, stored in checkpoints (demo.py and --eval --resume rebuild from them)
ALIGNER_FLAGS = ("no_sam", "sam_resample", "sam_points", "no_sam_reweight", "sam_search")


def build_aligner_options(args) -> AlignerOptions:
    """The ablation switches --no_sam, --sam_resample, --sam_points, --no_sam_reweight and
    --sam_search (argument sets that predate them, as official checkpoints store, mean the official model)."""
    return AlignerOptions(enabled=not getattr(args, "no_sam", False),
                          resample=getattr(args, "sam_resample", "salient"),
                          points=getattr(args, "sam_points", None),
                          reweight=not getattr(args, "no_sam_reweight", False),
                          search=getattr(args, "sam_search", "box"))
