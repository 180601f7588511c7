"""Barlow Twins' photometric views: colour jitter, greyscale, Gaussian blur and solarisation, per image.

Zbontar et al. (2021) take BYOL's views: after the crop and flip, colour jitter (brightness 0.4,
contrast 0.4, saturation 0.2, hue 0.1, the four in a random order; p 0.8), greyscale (p 0.2),
Gaussian blur (σ from [0.1, 2]; p 1.0 in the first view, 0.1 in the second) and solarisation
(p 0 and 0.2). Every draw comes from the caller's generator, the same number per image whatever
the image holds, so a batch stays a function of (seed, epoch) like every batch of this project.
Images go in and out as uint8 (N×C×H×W, C = 1 or 3: greyscale images skip saturation and hue);
the arithmetic is elementwise, and the blur's weights and the contrast's mean are numpy's, so the
bits do not depend on the thread count (a pipeline's first stage and the reference trainer draw
identical batches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale
DRAWS = 13  # uniforms per image: jitter on, 4 strengths, 4 for the order, greyscale on, blur on, σ, solarise on


@dataclass(frozen=True)
class Photometric:
    """One view's recipe: each transform's probability, and the jitter's strengths (torchvision ColorJitter's)."""

    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.0
    sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0


# config key `photometric`: the recipe of each view, in row order (rows [0, N) are the first views, [N, 2N) the second)
PHOTOMETRIC: dict[str, tuple[Photometric, ...]] = {
    "none": (),
    "barlow_twins": (Photometric(blur=1.0), Photometric(blur=0.1, solarize=0.2)),
}


def grey(x: torch.Tensor) -> torch.Tensor:
    """The luma of float images (N×1×H×W); greyscale images are their own."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (r * GREY[0] + g * GREY[1] + b * GREY[2]).unsqueeze(1)


def _per_image(f: torch.Tensor) -> torch.Tensor:
    return f[:, None, None, None]


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Scale every pixel by f (one factor per image)."""
    return (x * _per_image(f)).clamp_(0, 1)


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend each image with the mean of its luma: f < 1 flattens, f > 1 sharpens contrast."""
    # numpy's pairwise sum in float64: the same bits at any torch thread count
    mean = torch.from_numpy(grey(x).flatten(1).double().numpy().mean(axis=1)).float()
    f = _per_image(f)
    return (f * x + (1 - f) * _per_image(mean)).clamp_(0, 1)


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend each colour image with its luma: f = 0 is grey, f > 1 more saturated."""
    if x.shape[1] == 1:
        return x
    f = _per_image(f)
    return (f * x + (1 - f) * grey(x)).clamp_(0, 1)


def hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each colour image's hue by `shift` turns (in [-0.5, 0.5]), through HSV."""
    if x.shape[1] == 1:
        return x
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + shift[:, None, None]) % 1.0, s, v)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(1)
    high, low = x.amax(1), x.amin(1)
    flat = high == low
    span = high - low
    s = span / torch.where(flat, torch.ones_like(high), high)
    span = torch.where(flat, torch.ones_like(span), span)
    rc, gc, bc = (high - r) / span, (high - g) / span, (high - b) / span
    h = torch.where(high == r, bc - gc, torch.where(high == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return (h / 6.0 + 1.0) % 1.0, s, high


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # branch-free: channel n (R 5, G 3, B 1) is v - v·s·clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6
    chroma, h6 = v * s, h * 6.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n) % 6.0
        channels.append(v - chroma * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(channels, 1)


def blur_kernel_size(height: int, width: int) -> int:
    """BYOL's Gaussian blur kernel: odd, about a tenth of the image side (23 at 224), at least 3."""
    return max(3, 2 * math.floor(0.05 * min(height, width)) + 1)


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur with one σ per image (reflected borders), as torchvision's gaussian_blur."""
    k = blur_kernel_size(*x.shape[2:])
    offsets = np.arange(k) - k // 2
    # in numpy: torch's exp may take a vector path for some elements and a scalar one for others, split by thread
    weights = np.exp(-0.5 * (offsets[None, :] / sigma.double().numpy()[:, None]) ** 2)
    weights = torch.from_numpy(weights / weights.sum(1, keepdims=True)).float()
    pad = k // 2
    for dim in (2, 3):  # rows, then columns: a weighted sum of k shifted copies
        padded = torch.nn.functional.pad(x, (pad, pad, 0, 0) if dim == 3 else (0, 0, pad, pad), mode="reflect")
        size = x.shape[dim]
        x = sum(_per_image(weights[:, j]) * padded.narrow(dim, j, size) for j in range(k))
    return x


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert every pixel at or above half brightness (PIL's ImageOps.solarize: 128 of 255)."""
    return torch.where(x >= 128 / 255, 1.0 - x, x)


def photometric_view(x: torch.Tensor, recipe: Photometric, generator: torch.Generator) -> torch.Tensor:
    """One view's photometric transforms on a uint8 batch, each image's drawn from `generator` (DRAWS per image)."""
    n = x.shape[0]
    u = torch.rand(n, DRAWS, generator=generator)
    out = x.float().div_(255)
    jitter = u[:, 0] < recipe.jitter

    def spread(col: int, strength: float) -> torch.Tensor:  # uniform in [max(0, 1 - strength), 1 + strength]
        low = max(0.0, 1 - strength)
        return low + (1 + strength - low) * u[:, col]

    ops = [(brightness, spread(1, recipe.brightness)), (contrast, spread(2, recipe.contrast)),
           (saturation, spread(3, recipe.saturation)), (hue, recipe.hue * (2 * u[:, 4] - 1))]
    order = u[:, 5:9].argsort(1)  # each image's own order of the four, as ColorJitter draws one per call
    for position in range(len(ops)):
        for op, (fn, factor) in enumerate(ops):
            rows = jitter & (order[:, position] == op)
            if rows.any():
                out[rows] = fn(out[rows], factor[rows])
    rows = u[:, 9] < recipe.grayscale
    if rows.any():
        out[rows] = grey(out[rows]).expand(-1, x.shape[1], -1, -1)
    rows = u[:, 10] < recipe.blur
    if rows.any():
        low, high = recipe.sigma
        out[rows] = blur(out[rows], low + (high - low) * u[rows, 11])
    rows = u[:, 12] < recipe.solarize
    if rows.any():
        out[rows] = solarize(out[rows])
    return out.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def view_block(rows: int, recipes: tuple[Photometric, ...]) -> int:
    """Rows per view in a batch of `rows` holding len(recipes) equal blocks, one per view (rows i, i + block, ...
    are one image's views)."""
    if rows % len(recipes):
        raise ValueError(f"a batch of {rows} rows does not split into {len(recipes)} equal blocks of views")
    return rows // len(recipes)


def photometric_views(x: torch.Tensor, recipes: tuple[Photometric, ...], generator: torch.Generator) -> torch.Tensor:
    """Each view's block of the batch with its recipe (no recipes: the batch as it is)."""
    if not recipes:
        return x
    blocks = x.split(view_block(x.shape[0], recipes))
    return torch.cat([photometric_view(block, recipe, generator) for block, recipe in zip(blocks, recipes)])
