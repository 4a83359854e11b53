"""ResNet backbone with frozen BatchNorm (or, to train from scratch, trainable BatchNorm), joined
with the sine position encoding."""
import os
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from util.checkpoint import CorruptCheckpointError, UnsafeCheckpointError, load_checkpoint
from util.misc import NestedTensor

from .code_path import has_call_hooks, step_aside
from .position_encoding import SAM_DETR_PIXEL_OFFSET, PositionEmbeddingSine
from .weights import resnet_name

STAGES = ("layer1", "layer2", "layer3", "layer4")
TRAINABLE_STAGES = ("layer2", "layer3", "layer4")  # stem and layer1 stay frozen, as in DETR
# "frozen": the official backbone, BatchNorms fixed to their ImageNet statistics (identities on
# random weights). "batch": trainable BatchNorms and every stage trained, for training from random
# weights, where a ResNet without normalisation learns many times slower.
BACKBONE_NORMS = ("frozen", "batch")
MULTISCALE_STAGES = ("layer2", "layer3", "layer4")  # strides 8, 16, 32
SKIP_PRETRAINED_ENV = "SAMDETR_NO_PRETRAINED"

# --backbone_weights FILE: a torchvision ResNet state dict, possibly nested and prefixed
NESTING_KEYS = ("state_dict", "model")  # where training frameworks nest the weights in a checkpoint
STEM_KEY = "conv1.weight"  # the stem's convolution: where it sits gives the prefix of a file's keys
FIRST_BLOCK_KEY = "layer1.0.conv1.weight"  # beside the stem under the same prefix (tells it from a block's conv1)
BOTTLENECK_KEY = "layer1.0.conv3.weight"  # only Bottleneck blocks have a third convolution
CLASSIFIER_PREFIX = "fc."  # ImageNet classifier (or a self-supervised head): not part of the detector
BN_COUNTER_SUFFIX = "num_batches_tracked"  # a BatchNorm's step count: no weight, frozen norms drop it
KEYS_SHOWN = 5  # keys listed per kind of mismatch in an error


class BackboneWeightsError(ValueError):
    """ImageNet weights for --backbone that cannot be had: a failed download or a file that does not fit."""


def _out_channels(stage: nn.Module) -> int:
    """Channels a ResNet stage produces: those of its last convolution."""
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


Affine = Tuple[Tensor, Tensor]  # per-channel (scale, bias) of a frozen BatchNorm


def frozen_bn_affines(norms: Sequence[FrozenBatchNorm2d]) -> List[Affine]:
    """The per-channel scale and bias of every frozen BatchNorm, computed for all of them at once.

    A frozen BatchNorm is x * scale + bias with scale = weight / sqrt(running_var + eps) and
    bias = bias - running_mean * scale (torchvision's arithmetic). Computing these for the ~50
    norms of a ResNet together takes nine ops instead of five per norm.
    """
    eps = norms[0].eps
    weight, bias, mean, var = (torch.cat([getattr(n, name) for n in norms])
                               for name in ("weight", "bias", "running_mean", "running_var"))
    scale = weight * (var + eps).rsqrt()
    shift = bias - mean * scale
    sizes = [n.weight.numel() for n in norms]
    return list(zip(scale.split(sizes), shift.split(sizes)))


def conv_affine(conv: nn.Conv2d, affine: Affine, x: Tensor) -> Tensor:
    """conv followed by a frozen BatchNorm's affine map, folded into the convolution's weights
    and bias: the same numbers up to float rounding, without two passes over the activations
    forward and backward. The gradient of the weights flows through the fold (the parity tests
    hold the official gradients, with a wide margin, in every configuration). A convolution that
    is not a plain nn.Conv2d (a replaced module) is called as it is, and the affine map applied
    after it.
    """
    scale, shift = affine
    if type(conv) is not nn.Conv2d:  # a researcher's replacement: its own forward, then the affine map
        return torch.addcmul(shift.view(1, -1, 1, 1), conv(x), scale.view(1, -1, 1, 1))
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), shift, conv.stride, conv.padding,
                    conv.dilation, conv.groups)


def channels_last_1x1_weights(module: nn.Module) -> nn.Module:
    """Gives each 1x1 convolution weight in `module` the strides of the channels-last layout, in place.

    For a 1x1 kernel both layouts are the same memory, so no number changes. But a convolution over
    channels-last maps (the backbone's, and input_proj reading them) returns its weight gradient
    with channels-last strides, and DDP, which compares each gradient's strides with those of the
    parameter, would copy that gradient at every step and warn "Grad strides do not match bucket
    view strides".
    """
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.weight.is_contiguous():
            channels = conv.weight.shape[1]
            conv.weight.data = conv.weight.data.as_strided(conv.weight.shape, (channels, 1, channels, channels))
    return module


def block_norms(block: nn.Module) -> List[FrozenBatchNorm2d]:
    """The frozen BatchNorms of a torchvision BasicBlock or Bottleneck, in the order applied."""
    norms = [block.bn1, block.bn2] + ([block.bn3] if isinstance(block, Bottleneck) else [])
    return norms + ([block.downsample[1]] if block.downsample is not None else [])


def residual_block(block: nn.Module, x: Tensor, affines: Iterator[Affine]) -> Tensor:
    """A torchvision BasicBlock or Bottleneck, its frozen BatchNorms applied as precomputed affines
    taken from `affines` in the order of `block_norms`."""
    convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])
    out = x
    for i, conv in enumerate(convs):
        out = conv_affine(conv, next(affines), out)
        if i < len(convs) - 1:
            out = F.relu(out, inplace=True)
    identity = x
    if block.downsample is not None:
        identity = conv_affine(block.downsample[0], next(affines), x)
    # in place, as torchvision's blocks do: `out` is a fresh map, and a fresh allocation of an
    # early stage's map costs more on the CPU than the add or the ReLU itself
    return F.relu(out.add_(identity), inplace=True)


class ResNetBody(nn.Module):
    """The stem and stages of a torchvision ResNet, returning the outputs of `return_stages`.

    Holds the ResNet's own submodules under their own names, so parameter names read
    `conv1.weight`, `layer2.0.conv1.weight`, ... as in DETR checkpoints. The frozen BatchNorms'
    affine maps are computed together once per forward (see `frozen_bn_affines`) and folded into
    the convolutions (see `conv_affine`), which run on channels-last maps.
    """

    def __init__(self, resnet: nn.Module, return_stages: Sequence[str]):
        super().__init__()
        last = max(STAGES.index(s) for s in return_stages)
        for name in ("conv1", "bn1", "maxpool") + STAGES[: last + 1]:
            self.add_module(name, getattr(resnet, name))
        self.stages = STAGES[: last + 1]
        self.return_stages = tuple(return_stages)
        channels_last_1x1_weights(self)
        # trainable BatchNorms (BACKBONE_NORMS "batch") normalise by batch statistics: run as modules
        self.frozen_norms = isinstance(self.bn1, FrozenBatchNorm2d)
        if not self.frozen_norms:
            return
        # The affines are handed out by position (module identities do not survive tracing), so
        # the order of self.modules() must be the order in which forward applies the norms.
        applied = [self.bn1] + [n for stage in self.stages for block in getattr(self, stage) for n in block_norms(block)]
        norms = [m for m in self.modules() if isinstance(m, FrozenBatchNorm2d)]
        if len(norms) != len(applied) or any(a is not b for a, b in zip(norms, applied)):
            raise ValueError("unexpected ResNet layout: BatchNorms not in the order they are applied")
        if len({m.eps for m in norms}) > 1:
            raise ValueError("the backbone's frozen BatchNorms must share one eps")

    def forward(self, x: Tensor) -> List[Tensor]:
        # oneDNN's convolutions, forward and backward, are fastest on channels-last maps (on the
        # CPU about 15% for the trainable stages, which train with the same gradients up to rounding)
        x = x.contiguous(memory_format=torch.channels_last)
        if not self.frozen_norms:
            return self._forward_modules(x)
        if any(has_call_hooks(m) for m in self.modules()) or not self._plain_blocks():
            step_aside("backbone", "a module of the ResNet has hooks or a block is not a torchvision "
                       "BasicBlock / Bottleneck with frozen BatchNorms")
            return self._forward_modules(x)
        affines = iter(frozen_bn_affines([m for m in self.modules() if isinstance(m, FrozenBatchNorm2d)]))
        x = self.maxpool(F.relu(conv_affine(self.conv1, next(affines), x), inplace=True))
        outs = []
        for name in self.stages:
            for block in getattr(self, name):
                x = residual_block(block, x, affines)
            if name in self.return_stages:
                outs.append(x)
        return outs

    def _plain_blocks(self) -> bool:
        """Whether every block is one residual_block knows (its norms frozen and in their place)."""
        blocks = [block for name in self.stages for block in getattr(self, name)]
        return (type(self.bn1) is FrozenBatchNorm2d
                and all(type(b) in (BasicBlock, Bottleneck) and all(type(n) is FrozenBatchNorm2d for n in block_norms(b))
                        for b in blocks))

    def _forward_modules(self, x: Tensor) -> List[Tensor]:
        """The torchvision stem and blocks as they are (with trainable norms nothing folds)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        outs = []
        for name in self.stages:
            x = getattr(self, name)(x)
            if name in self.return_stages:
                outs.append(x)
        return outs


class Backbone(nn.Module):
    """A torchvision ResNet with frozen BatchNorm (norm "frozen", the official model) or with
    trainable BatchNorm and all stages trained (norm "batch", see BACKBONE_NORMS).

    Returns C5 (or C3-C5 with `multiscale`) as NestedTensors whose masks are the image
    padding mask resized to each map.
    """

    def __init__(self, name: str, train_backbone: bool, multiscale: bool, dilation: bool,
                 pretrained: bool, norm: str = "frozen", weights_file: Optional[str] = None):
        """`pretrained`: ImageNet weights, from `weights_file` (a torchvision state dict, see
        resnet_state_from_file) when given, else from torchvision (downloaded, or its cached file)."""
        super().__init__()
        if norm not in BACKBONE_NORMS:
            raise ValueError(f"--backbone_norm {norm!r}: expected one of {BACKBONE_NORMS}")
        try:
            resnet = torchvision.models.get_model(
                name, weights=None, norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d,
                replace_stride_with_dilation=[False, False, dilation])
        except NotImplementedError as e:
            raise ValueError(f"--backbone {name} does not support --dilation: {e}") from e
        if pretrained:
            # the state dict goes in as torchvision's own builder puts its weights in (after
            # building), whichever its source, so the norms freeze the same numbers either way
            state = resnet_state_from_file(weights_file) if weights_file else torchvision_imagenet_state(name)
            source = f"--backbone_weights {weights_file}" if weights_file else f"torchvision's {name} weights"
            load_resnet_state(resnet, state, source, name)
        stages = MULTISCALE_STAGES if multiscale else ("layer4",)
        self.body = ResNetBody(resnet, stages)
        trainable = TRAINABLE_STAGES if norm == "frozen" else ("",)
        for pname, p in self.body.named_parameters():
            if not train_backbone or not pname.startswith(trainable):
                p.requires_grad_(False)
        self.num_channels = [_out_channels(getattr(self.body, s)) for s in stages]

    def forward(self, samples: NestedTensor) -> List[NestedTensor]:
        feats = self.body(samples.tensors)
        masks = [F.interpolate(samples.mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0]
                 for f in feats]
        return [NestedTensor(f, m) for f, m in zip(feats, masks)]


class Joiner(nn.Sequential):
    """(backbone, position encoding); index 0 keeps the official `backbone.0.*` names."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, samples: NestedTensor) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """-> features (B, C_l, H_l, W_l), masks (B, H_l, W_l), positions (B, d_model, H_l, W_l)."""
        levels = self[0](samples)
        feats = [lvl.tensors for lvl in levels]
        masks = [lvl.mask for lvl in levels]
        pos = [self[1](m).to(f.dtype) for f, m in zip(feats, masks)]
        return feats, masks, pos


def torchvision_imagenet_state(name: str) -> Dict[str, Tensor]:
    """torchvision's ImageNet state dict of ResNet `name` (IMAGENET1K_V1, the official backbone):
    from its cache, downloaded there first if absent; BackboneWeightsError when that fails."""
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad download's hash a RuntimeError
        file_name = os.path.basename(urlparse(weights.url).path)
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
        raise BackboneWeightsError(
            f"--backbone {name}: could not get torchvision's ImageNet weights {file_name} "
            f"({type(error).__name__}: {error}). Without internet, download {weights.url} elsewhere and copy it "
            f"to {cached} (torchvision's cache, read before any download), or pass --backbone_weights "
            f"/path/to/{file_name}") from error


def _resnet_prefixes(state: Mapping[str, object]) -> List[str]:
    """The prefixes under which `state` holds a ResNet's stem and first block ("" for none)."""
    prefixes = [key[: -len(STEM_KEY)] for key in state if key.endswith(STEM_KEY)]
    return sorted(p for p in prefixes if (not p or p.endswith(".")) and f"{p}{FIRST_BLOCK_KEY}" in state)


def resnet_state_from_file(path: str) -> Dict[str, Tensor]:
    """The torchvision ResNet state dict in file `path`, loaded weights-only (util.checkpoint).

    Also takes a checkpoint nesting it under one of NESTING_KEYS, with its keys prefixed (e.g.
    "module.", "backbone.", "module.encoder."): the prefix is what precedes the stem's `conv1.weight`,
    and is stripped. Returns the tensors under that prefix; BackboneWeightsError when there is no
    ResNet, or more than one (a MoCo checkpoint's two encoders).
    """
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except (FileNotFoundError, CorruptCheckpointError, UnsafeCheckpointError) as error:
        raise BackboneWeightsError(f"--backbone_weights: {error}") from error
    state = ckpt
    if isinstance(ckpt, Mapping) and not _resnet_prefixes(ckpt):
        state = next((ckpt[k] for k in NESTING_KEYS if isinstance(ckpt.get(k), Mapping)), ckpt)
    prefixes = _resnet_prefixes(state) if isinstance(state, Mapping) else []
    if len(prefixes) != 1:
        found = (f"ResNets under several prefixes, {', '.join(map(repr, prefixes))}: save the one to use (MoCo's: "
                 f"encoder_q) alone, its keys without the prefix, and pass that file" if prefixes else
                 f"no ResNet: no {STEM_KEY!r} with {FIRST_BLOCK_KEY!r} beside it, under any prefix, at the top "
                 f"or under {' or '.join(map(repr, NESTING_KEYS))} (top-level keys: {_some(ckpt)})")
        raise BackboneWeightsError(f"--backbone_weights {path} holds {found}")
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def _some(keys) -> str:
    """The first KEYS_SHOWN of `keys` (or of a non-dict's type), for an error message."""
    if not isinstance(keys, Mapping):
        return type(keys).__name__
    names = list(keys)
    return ", ".join(map(str, names[:KEYS_SHOWN])) + (", ..." if len(names) > KEYS_SHOWN else "")


def _optional_key(key: str) -> bool:
    """Keys a file may have or lack: the classifier and the BatchNorms' step counters."""
    return key.startswith(CLASSIFIER_PREFIX) or key.endswith(BN_COUNTER_SUFFIX)


def _layout(state: Mapping[str, Tensor]) -> str:
    """The ResNet of a bare state dict in words, e.g. "a resnet18-like layout (BasicBlock)"."""
    block = "Bottleneck" if BOTTLENECK_KEY in state else "BasicBlock"
    name = resnet_name(state, body="")
    return f"a {name}-like layout ({block})" if name else f"a layout of no known ResNet ({block} in layer1)"


def _key_problems(mine: Mapping[str, Tensor], theirs: Mapping[str, Tensor]) -> str:
    """A few missing, unexpected and mis-shaped keys of `theirs` against `mine` ("" when none)."""
    problems = {"missing": sorted(set(mine) - set(theirs)), "unexpected": sorted(set(theirs) - set(mine)),
                "mis-shaped": [f"{k} {tuple(theirs[k].shape)} (needs {tuple(mine[k].shape)})"
                               for k in sorted(set(mine) & set(theirs)) if theirs[k].shape != mine[k].shape]}
    return "; ".join(f"{kind} ({len(keys)}): {', '.join(keys[:KEYS_SHOWN])}{', ...' if len(keys) > KEYS_SHOWN else ''}"
                     for kind, keys in problems.items() if keys)


def load_resnet_state(resnet: nn.Module, state: Mapping[str, Tensor], source: str, name: str) -> None:
    """Loads `state` (a torchvision ResNet state dict; the classifier fc.* optional and ignored)
    into the torchvision ResNet `resnet` of --backbone `name`; BackboneWeightsError naming `source`,
    the backbone, the layouts and a few keys when names or shapes differ."""
    mine = {k: v for k, v in resnet.state_dict().items() if not _optional_key(k)}
    theirs = {k: v for k, v in state.items() if not _optional_key(k)}
    details = _key_problems(mine, theirs)
    if details:
        layouts = (f"it holds {_layout(theirs)}, --backbone {name} needs {_layout(mine)}"
                   if _layout(theirs) != _layout(mine) else f"it does not fit --backbone {name}")
        found = resnet_name(theirs, body="")
        fix = f" (pass --backbone {found}, or the weights of a {name})" if found and found != name else ""
        raise BackboneWeightsError(f"{source}: {layouts}{fix}. Keys {details}")
    resnet.load_state_dict(theirs, strict=False)  # strict but for the optional keys, checked above


def use_pretrained_backbone(args) -> bool:
    """ImageNet weights are wanted unless switched off, or unless a checkpoint replaces them all."""
    if os.environ.get(SKIP_PRETRAINED_ENV, "") not in ("", "0"):
        return False
    replaced = getattr(args, "resume", "") or getattr(args, "finetune", "")  # both load every backbone weight
    return bool(getattr(args, "pretrained_backbone", True)) and not replaced


def build_backbone(args, pixel_offset: float = SAM_DETR_PIXEL_OFFSET) -> Joiner:
    """The ResNet of args.backbone and the sine encoding (see PositionEmbeddingSine for `pixel_offset`)."""
    backbone = Backbone(args.backbone, train_backbone=args.lr_backbone > 0,
                        multiscale=args.multiscale, dilation=args.dilation,
                        pretrained=use_pretrained_backbone(args),
                        norm=getattr(args, "backbone_norm", "frozen"),
                        weights_file=getattr(args, "backbone_weights", None))
    return Joiner(backbone, PositionEmbeddingSine(args.hidden_dim // 2, pixel_offset=pixel_offset))
