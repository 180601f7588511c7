"""Local heads: the small classifiers that give each module its own loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import PoolLinear
from pipeline.syncbn import PlainBatchNorm


class ConvLinearHead(nn.Module):
    """Belilovsky et al.'s CIFAR head: a 3x3 conv + BN + ReLU, global average pooling, a linear layer."""

    def __init__(self, channels: int, num_classes: int, width: int = 0) -> None:
        super().__init__()
        width = width or channels
        self.conv = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = PoolLinear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.conv(x))


def simplex_etf(dim: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """A dim×C simplex equiangular tight frame: unit columns with pairwise inner product -1/(C-1) (Eq. 7).

    The C centred one-hot vectors span a (C-1)-dimensional space; an orthonormal basis of it,
    rotated into `dim` dimensions by a seeded random orthonormal map, gives the frame.
    """
    if dim < num_classes - 1:
        raise ValueError(f"a simplex ETF of {num_classes} classes needs feature dim >= {num_classes - 1}, got {dim}")
    c = num_classes
    centred = torch.eye(c, dtype=torch.float64) - 1.0 / c
    eigvals, eigvecs = torch.linalg.eigh(centred)
    basis = eigvecs[:, eigvals > 0.5]  # C × (C-1), the eigenvalue-1 subspace
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, c - 1, generator=g, dtype=torch.float64))
    frame = rotation @ basis.T * (c / (c - 1)) ** 0.5  # dim × C
    return frame.float()


class ETFHead(nn.Module):
    """A fixed, non-trainable simplex ETF classifier on flat or globally pooled features."""

    def __init__(self, channels: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.register_buffer("frame", simplex_etf(channels, num_classes, seed))

    def forward(self, x):
        if x.dim() == 4:
            x = x.mean(dim=(2, 3))
        return x @ self.frame


class TokenLinearHead(nn.Module):
    """Transformer head on channels-last features (ViT tokens N×L×D, Swin maps N×H×W×C): LayerNorm, mean over positions, linear."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.norm(x).flatten(1, -2).mean(dim=1))


class Decoder(nn.Module):
    """InfoPro's CIFAR decoder: features upsampled (bilinear, or nearest) to the image's size, conv 3x3 + BN + ReLU,
    conv 3x3 to the image's channels; returns logits (the loss applies the sigmoid). Width 12 as in the authors' code."""

    def __init__(self, channels: int, image_channels: int, width: int = 12, upsampling: str = "bilinear") -> None:
        super().__init__()
        self.upsampling = upsampling
        self.layers = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                    nn.Conv2d(width, image_channels, 3, padding=1))

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        corners = True if self.upsampling == "bilinear" else None  # align_corners exists for bilinear only
        return self.layers(F.interpolate(features, size=size, mode=self.upsampling, align_corners=corners))


class InfoProHead(nn.Module):
    """A module's classifier head and its InfoPro decoder; calling it gives the classifier's logits (evaluation)."""

    def __init__(self, classifier: nn.Module, decoder: Decoder) -> None:
        super().__init__()
        self.classifier, self.decoder = classifier, decoder

    def forward(self, x):
        return self.classifier(x)


class Pool(nn.Module):
    """A module's output as N×D features: global average pooling over its positions (flat features pass as they are)."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, x):
        if self.layout == "nchw":
            return x.mean(dim=(2, 3))
        if self.layout == "flat":
            return x.flatten(1)
        return x.flatten(1, -2).mean(dim=1)  # tokens N×L×D, Swin maps N×H×W×C


class ProjectorHead(nn.Module):
    """Barlow Twins' projector: pooled features, then three bias-free linear layers of `width`, BatchNorm and ReLU
    after the first two (the paper's 8192-8192-8192 for ResNet-50). The BatchNorm is syncbn.PlainBatchNorm, whose
    double backward (SGR's) is plain ops: BatchNorm1d's fused one does not repeat on a GPU."""

    def __init__(self, channels: int, width: int, layout: str) -> None:
        super().__init__()
        self.pool = Pool(layout)
        self.mlp = nn.Sequential(
            nn.Linear(channels, width, bias=False), PlainBatchNorm(width), nn.ReLU(),
            nn.Linear(width, width, bias=False), PlainBatchNorm(width), nn.ReLU(),
            nn.Linear(width, width, bias=False))

    def forward(self, x):
        return self.mlp(self.pool(x))


# The feature layouts (pipeline.models.Network.layout) each head reads.
HEAD_LAYOUTS = {"conv_linear": ("nchw",), "etf": ("nchw", "flat"), "token_linear": ("tokens", "nhwc")}


def feature_channels(out: torch.Tensor, layout: str) -> int:
    """The channel (feature) dimension of a module's output in this layout."""
    return out.shape[1] if layout == "nchw" else out.shape[-1]


def build_head(
    kind: str, channels: int, num_classes: int, *, width: int = 0, seed: int = 0, layout: str = "nchw"
) -> nn.Module:
    """A local head by name ('conv_linear', 'etf', 'token_linear' or 'projector' of `width`) for features of this
    layout and channel count."""
    if kind in HEAD_LAYOUTS and layout not in HEAD_LAYOUTS[kind]:
        fits = [k for k, layouts in HEAD_LAYOUTS.items() if layout in layouts]
        raise ValueError(f"head {kind!r} reads {'/'.join(HEAD_LAYOUTS[kind])} features but this model's are {layout}; "
                         f"use head {' or '.join(fits)}")
    if kind == "token_linear":
        return TokenLinearHead(channels, num_classes)
    if kind == "conv_linear":
        return ConvLinearHead(channels, num_classes, width)
    if kind == "etf":
        return ETFHead(channels, num_classes, seed)
    if kind == "projector":
        return ProjectorHead(channels, width, layout)
    raise ValueError(f"unknown head {kind!r}; use conv_linear, etf, token_linear, projector or own (last module only)")
