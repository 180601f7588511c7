"""Models by name, as in timm: every family is registered once, and `build_network` builds any model by its name.

A family either takes a depth from its name (`resnet32`: family `resnet`, depth 32) or is one
fixed model (`vit_s16`). Register your own with `register_model("mynet")(builder)`, where
`builder(in_channels=, num_classes=, input_size=, **model_args)` (after the depth, for a family
with `with_depth=True`) returns a `Network`; `launch.py models` lists what is registered.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

from pipeline import models as cifar
from pipeline import models_torchvision as tv
from pipeline.models import Network


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered name, and a line about it for `launch.py models`."""

    build: Callable[..., Network]
    with_depth: bool
    about: str


REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, with_depth: bool = False, about: str = "") -> Callable[[Callable[..., Network]], Callable[..., Network]]:
    """A decorator (or a call on a builder) that registers `name`; registering a name twice is an error."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or (with_depth and name[-1].isdigit()):
        raise ValueError(f"model name {name!r}: use lower-case letters, digits and _ (a family with a depth: end in a letter)")

    def add(build: Callable[..., Network]) -> Callable[..., Network]:
        if name in REGISTRY:
            raise ValueError(f"model {name!r} is registered already")
        REGISTRY[name] = ModelEntry(build, with_depth, about)
        return build

    return add


def model_names() -> list[str]:
    """Every name `build_network` accepts, a family as `resnet<depth>`."""
    return [f"{name}<depth>" if entry.with_depth else name for name, entry in REGISTRY.items()]


def _resolve(name: str) -> tuple[ModelEntry, int | None] | None:
    """A model name's entry and depth: a fixed model ('vit_s16': no depth) or a family and its depth ('resnet32');
    None if nothing registered answers to it."""
    entry = REGISTRY.get(name)
    if entry is not None and not entry.with_depth:
        return entry, None
    match = re.fullmatch(r"([a-z_]+)(\d+)", name)
    entry = REGISTRY.get(match.group(1)) if match else None
    return (entry, int(match.group(2))) if entry is not None and entry.with_depth else None


def model_args_of(name: str) -> list[str] | None:
    """The `model_args` a model name takes (None: unknown name, or a builder that passes any on, as torchvision's)."""
    resolved = _resolve(name)
    if resolved is None:
        return None
    params = inspect.signature(resolved[0].build).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in ("depth", "in_channels", "num_classes", "input_size")]


def build_network(name: str, in_channels: int, num_classes: int, input_size: int, **kwargs) -> Network:
    """Build a registered model by name: a family and a depth ('resnet32', 'vgg17') or a fixed model ('vit_s16')."""
    resolved = _resolve(name)
    if resolved is None:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(model_names())} (e.g. resnet32; "
                         "`launch.py models` describes them)")
    entry, depth = resolved
    depth_arg = () if depth is None else (depth,)
    return entry.build(*depth_arg, in_channels=in_channels, num_classes=num_classes, input_size=input_size, **kwargs)


for _name, _build, _about in [
    ("resnet", cifar.cifar_resnet, "CIFAR ResNet-(6n+2): a stem and 3 stages of n basic blocks (resnet32, resnet110)"),
    ("plainnet", cifar.plainnet, "the CIFAR ResNet without skip connections (plainnet32)"),
    ("vgg", cifar.vgg, "VGG-style: depth-1 conv layers over the width stages, then a linear classifier (vgg17)"),
    ("mlp", cifar.mlp, "depth fully connected layers, for the BP-free baselines (mlp3)"),
    ("plainconv", cifar.plainconv, "depth 3x3 conv + BN + ReLU layers over 3 stages, for the BP-free baselines"),
]:
    register_model(_name, with_depth=True, about=_about)(_build)
for _name, _build, _about in [
    ("tv_resnet18", partial(tv.tv_resnet, "resnet18"), "torchvision ResNet-18 (ImageNet)"),
    ("tv_resnet50", partial(tv.tv_resnet, "resnet50"), "torchvision ResNet-50 (ImageNet)"),
    ("tv_resnet101", partial(tv.tv_resnet, "resnet101"), "torchvision ResNet-101 (ImageNet)"),
    ("vit_s16", tv.vit_s16, "ViT-S/16 on torchvision's VisionTransformer"),
    ("swin_t", partial(tv.swin, "swin_t"), "torchvision Swin-T"),
    ("swin_s", partial(tv.swin, "swin_s"), "torchvision Swin-S"),
]:
    register_model(_name, about=_about)(_build)
