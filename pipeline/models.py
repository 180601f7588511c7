"""The CIFAR-style models (ResNet, PlainNet, VGG, MLP, plain conv), each a list of units a split cuts between.

A unit is the smallest piece a module can hold: the stem, one residual (or plain) block,
or one VGG conv layer. `resolution` gives each unit's spatial-resolution stage, which the
named splits use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.syncbn import PlainBatchNorm


@dataclass
class Network:
    """A model as cuttable units plus its own classifier (applied after the last unit)."""

    name: str
    units: list[nn.Module]
    resolution: list[int]  # resolution stage (0, 1, ...) of each unit
    classifier: nn.Module
    layout: str = "nchw"  # what units output: nchw (conv maps), flat (N, D), tokens (N, L, D) or nhwc (Swin's maps)

    def __post_init__(self) -> None:
        assert len(self.units) == len(self.resolution)


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class BasicBlock(nn.Module):
    """CIFAR basic block: two 3x3 convs; `residual=False` drops the skip (PlainNet)."""

    def __init__(self, c_in: int, c_out: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or c_in != c_out):
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return out.relu()


class PoolLinear(nn.Module):
    """Global average pooling followed by a linear classifier."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        if x.dim() == 4:
            x = x.mean(dim=(2, 3))
        return self.fc(x)


def cifar_resnet(
    depth: int, in_channels: int, num_classes: int, input_size: int, width: int = 16, residual: bool = True
) -> Network:
    """CIFAR ResNet-(6n+2): a stem and 3 stages of n basic blocks, widths w/2w/4w (any input size)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ResNet/PlainNet depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    units: list[nn.Module] = [conv_bn_relu(in_channels, width)]
    resolution = [0]
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            units.append(BasicBlock(c_in, c_out, stride, residual))
            resolution.append(stage)
            c_in = c_out
    name = f"{'resnet' if residual else 'plainnet'}{depth}"
    return Network(name, units, resolution, PoolLinear(c_in, num_classes))


def plainnet(depth: int, in_channels: int, num_classes: int, input_size: int, width: int = 16) -> Network:
    """PlainNet: the CIFAR ResNet without skip connections."""
    return cifar_resnet(depth, in_channels, num_classes, input_size, width=width, residual=False)


def vgg(
    depth: int,
    in_channels: int,
    num_classes: int,
    input_size: int,
    widths: tuple[int, ...] = (64, 128, 256, 512, 512),
) -> Network:
    """VGG-style net of `depth` layers: depth-1 conv layers spread over the width stages, then a linear classifier.

    A 2x2 max-pool ends each stage while the feature map is at least 2x2.
    """
    n_convs = depth - 1
    if n_convs < len(widths):
        raise ValueError(f"VGG depth must be at least {len(widths) + 1} for {len(widths)} stages, got {depth}")
    per_stage = [n_convs // len(widths) + (1 if s < n_convs % len(widths) else 0) for s in range(len(widths))]
    units: list[nn.Module] = []
    resolution: list[int] = []
    c_in, size = in_channels, input_size
    for stage, (c_out, count) in enumerate(zip(widths, per_stage)):
        for i in range(count):
            layer = conv_bn_relu(c_in, c_out)
            if i == count - 1 and size >= 2:
                layer.append(nn.MaxPool2d(2))
            units.append(layer)
            resolution.append(stage)
            c_in = c_out
        if size >= 2:
            size //= 2
    return Network(f"vgg{depth}", units, resolution, PoolLinear(c_in, num_classes))


class DenseLayer(nn.Module):
    """One linear map, then BatchNorm (norm=True) and a ReLU, on flattened inputs: the unit of the BP-free MLP."""

    def __init__(self, d_in: int, d_out: int, norm: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.norm: nn.Module = PlainBatchNorm(d_out) if norm else nn.Identity()  # SGR's double backward repeats

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The nonlinearity on the pre-activation fc(x): BatchNorm (if any) and ReLU."""
        return self.norm(pre).relu()

    def forward(self, x):
        return self.activate(self.fc(x.flatten(1)))


def ends_in_relu(unit: nn.Module) -> bool:
    """Whether a unit is one layer whose last op is a ReLU: a DenseLayer, or a conv + BN + ReLU block."""
    return isinstance(unit, DenseLayer) or (isinstance(unit, nn.Sequential) and isinstance(unit[-1], nn.ReLU))


def before_relu(unit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A one-layer unit's (ends_in_relu) output before its final ReLU."""
    if isinstance(unit, DenseLayer):
        return unit.norm(unit.fc(x.flatten(1)))
    return unit[:-1](x)


def mlp(depth: int, in_channels: int, num_classes: int, input_size: int, width: int = 256, norm: bool = True) -> Network:
    """`depth` DenseLayers of `width` units (one unit per layer, so split per_block puts each layer in a module).

    BatchNorm keeps the activations bounded under DFA and DRTP, whose signals do not shrink as the layer learns.
    """
    if depth < 1:
        raise ValueError(f"mlp depth must be >= 1, got {depth}")
    units: list[nn.Module] = [DenseLayer(in_channels * input_size * input_size, width, norm)]
    units += [DenseLayer(width, width, norm) for _ in range(depth - 1)]
    return Network(f"mlp{depth}", units, [0] * depth, PoolLinear(width, num_classes), layout="flat")


def plainconv(depth: int, in_channels: int, num_classes: int, input_size: int, width: int = 32) -> Network:
    """`depth` 3x3 conv + BN + ReLU layers over 3 resolution stages (widths w/2w/4w, stride 2 between stages)."""
    if depth < 3:
        raise ValueError(f"plainconv depth must be >= 3 (3 resolution stages), got {depth}")
    units: list[nn.Module] = []
    resolution: list[int] = []
    c_in = in_channels
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
        for i in range(depth // 3 + (1 if stage < depth % 3 else 0)):
            units.append(conv_bn_relu(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
            resolution.append(stage)
            c_in = c_out
    return Network(f"plainconv{depth}", units, resolution, PoolLinear(c_in, num_classes))
