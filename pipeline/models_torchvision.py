"""torchvision's ImageNet models (ResNet, ViT-S/16, Swin) as cuttable units, randomly initialised.

Each unit holds torchvision's own submodules, so the units followed by the classifier
compute exactly torchvision's forward. Units and their layout:
  - tv_resnet18/50/101: the stem (conv, BN, ReLU, max-pool), then each residual block; a unit's
    resolution is its residual stage (the stem belongs to stage 0). Features are (N, C, H, W).
  - vit_s16: the patch embedding (with class token, position embedding and dropout), then each
    encoder block; one resolution. Features are tokens (N, L, D).
  - swin_t/swin_s: the patch embedding, then each Swin block, the patch merging joined to the
    first block of the next stage; resolution is the stage. Features are (N, H, W, C).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from pipeline.models import Network

if TYPE_CHECKING:
    from torchvision import models as tvm


def _torchvision_models() -> Any:
    """torchvision.models, imported when a model is first built from it: the import alone takes seconds, and
    runs on the CIFAR-style models never need it."""
    from torchvision import models

    return models


def tv_resnet(arch: str, in_channels: int, num_classes: int, input_size: int, **kwargs: Any) -> Network:
    """A torchvision ResNet ('resnet18', 'resnet50', 'resnet101'); kwargs go to torchvision (e.g. width_per_group)."""
    if in_channels != 3:
        raise ValueError(f"torchvision models take RGB images, got {in_channels} channel(s)")
    net = getattr(_torchvision_models(), arch)(weights=None, num_classes=num_classes, **kwargs)
    units: list[nn.Module] = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)]
    resolution = [0]
    for stage, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
        units.extend(layer)
        resolution.extend([stage] * len(layer))
    classifier = nn.Sequential(net.avgpool, nn.Flatten(1), net.fc)
    return Network(f"tv_{arch}", units, resolution, classifier)


class ViTEmbedding(nn.Module):
    """ViT's input side: patches to tokens, the class token prepended, position embedding added, dropout."""

    def __init__(self, vit: tvm.VisionTransformer) -> None:
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.hidden_dim = vit.hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViTClassifier(nn.Module):
    """ViT's output side: the final LayerNorm, the class token, the linear head."""

    def __init__(self, vit: tvm.VisionTransformer) -> None:
        super().__init__()
        self.ln = vit.encoder.ln
        self.heads = vit.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.ln(x)[:, 0])


def vit_s16(in_channels: int, num_classes: int, input_size: int, **kwargs: Any) -> Network:
    """ViT-S/16 (width 384, 6 heads, 12 blocks, MLP 1536) for the data's image size; kwargs override any of these."""
    if in_channels != 3:
        raise ValueError(f"torchvision models take RGB images, got {in_channels} channel(s)")
    args = dict(image_size=input_size, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)
    args.update(kwargs)
    if args["image_size"] % args["patch_size"]:
        raise ValueError(f"image size {args['image_size']} must be divisible by the patch size {args['patch_size']}")
    if args["image_size"] != input_size:
        raise ValueError(f"model_args image_size {args['image_size']} differs from the data's image size {input_size}")
    vit = _torchvision_models().VisionTransformer(num_classes=num_classes, **args)
    units: list[nn.Module] = [ViTEmbedding(vit), *vit.encoder.layers]
    return Network("vit_s16", units, [0] * len(units), ViTClassifier(vit), layout="tokens")


def swin(arch: str, in_channels: int, num_classes: int, input_size: int, **kwargs: Any) -> Network:
    """A torchvision Swin ('swin_t', 'swin_s'); kwargs go to torchvision (e.g. stochastic_depth_prob)."""
    if in_channels != 3:
        raise ValueError(f"torchvision models take RGB images, got {in_channels} channel(s)")
    net = getattr(_torchvision_models(), arch)(weights=None, num_classes=num_classes, **kwargs)
    features = list(net.features)  # patch embedding, stage 1, merging, stage 2, merging, stage 3, merging, stage 4
    units: list[nn.Module] = [features[0]]
    resolution = [0]
    for stage, i in enumerate(range(1, len(features), 2)):
        blocks = list(features[i])
        if i > 1:
            blocks[0] = nn.Sequential(features[i - 1], blocks[0])
        units.extend(blocks)
        resolution.extend([stage] * len(blocks))
    classifier = nn.Sequential(net.norm, net.permute, net.avgpool, net.flatten, net.head)
    return Network(arch, units, resolution, classifier, layout="nhwc")
