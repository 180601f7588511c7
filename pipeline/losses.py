"""Local losses other than cross entropy: pure tensor math, no modules, optimizers or I/O.

- InfoPro (Wang et al., ICLR 2021): module k < K minimises λ1 · reconstruction of the input image
  from its output + λ2 · its head's cross entropy; λ1, λ2 move linearly with the module's depth
  between a first and a last pair (`infopro_weights`). The last module trains on cross entropy.
- Barlow Twins (Zbontar et al., ICML 2021): the cross-correlation of two views' projections is
  pushed towards the identity (`barlow_twins_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# InfoPro's published coefficients (λ1 first, λ2 first, λ1 last, λ2 last) by K, from the authors' CIFAR-10
# commands (github.com/blackfeather-wang/InfoPro-Pytorch, "Experiments on CIFAR-SVHN-STL10/comand.sh"):
# ResNet-32 for K = 2, 4, 8, 16; K = 3 is published only for ResNet-110 (InfoPro*, memory-balanced cuts).
INFOPRO_COEFFICIENTS = {2: (5.0, 1.0, 0.0, 0.0), 3: (5.0, 0.0, 5.0, 0.1), 4: (6.0, 0.0, 1.0, 2.0),
                        8: (5.0, 0.0, 0.0, 2.0), 16: (5.0, 0.05, 0.2, 0.5)}


def infopro_coefficients(k_total: int, given: list[float] | tuple[float, ...] = ()) -> tuple[float, ...]:
    """The (λ1 first, λ2 first, λ1 last, λ2 last) of a K-module run: `given`, else the published ones for K."""
    if given:
        return tuple(given)
    if k_total not in INFOPRO_COEFFICIENTS:
        raise ValueError(f"InfoPro's coefficients are published for K in {sorted(INFOPRO_COEFFICIENTS)}, not "
                         f"K = {k_total}: give infopro_lambdas: [λ1 first, λ2 first, λ1 last, λ2 last]")
    return INFOPRO_COEFFICIENTS[k_total]


def infopro_weights(k: int, k_total: int, coefficients: tuple[float, ...]) -> tuple[float, float]:
    """(λ1, λ2) of module k (0-based) < K-1, linear in depth over modules 0..K-2 as in InfoPro's code (the last
    module has no decoder and trains on cross entropy alone)."""
    ratio = k / (k_total - 2) if k_total > 2 else 0.0
    first_x, first_y, last_x, last_y = coefficients
    return first_x * (1 - ratio) + last_x * ratio, first_y * (1 - ratio) + last_y * ratio


def reconstruction_loss(decoded_logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """InfoPro's reconstruction term: binary cross entropy between sigmoid(decoded) and the uint8 image in [0, 1].

    Taken on the logits (sigmoid inside the loss): the same value as sigmoid then BCE, stable, and allowed under
    autocast.
    """
    return F.binary_cross_entropy_with_logits(decoded_logits.float(), image.float() / 255)


def infopro_loss(logits: torch.Tensor, y: torch.Tensor, decoded_logits: torch.Tensor | None, image: torch.Tensor,
                 weights: tuple[float, float]) -> torch.Tensor:
    """λ1 · reconstruction + λ2 · cross entropy (a zero weight drops its term, and its head gets no gradient; with
    λ1 = 0 the decoder need not run: decoded_logits may be None)."""
    recon_weight, cls_weight = weights
    loss = torch.zeros((), device=logits.device)
    if recon_weight:
        loss = loss + recon_weight * reconstruction_loss(decoded_logits, image)
    if cls_weight:
        loss = loss + cls_weight * F.cross_entropy(logits, y)
    return loss


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each column centred and scaled to unit (biased) variance over the batch: Barlow Twins' affine-free BatchNorm."""
    z = z.float()
    return (z - z.mean(dim=0)) / (z.var(dim=0, unbiased=False) + eps).sqrt()


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, off_diagonal_weight: float, eps: float = 1e-5) -> torch.Tensor:
    """Σ_i (1 - C_ii)² + w · Σ_{i≠j} C_ij², C = the N×D projections' cross-correlation (standardised columns, / N).

    Zbontar et al. 2021, Eq. 1; rows i of z1 and z2 are two views of the same image. Computed in fp32 even under
    autocast: C_ii sits near 1, where bfloat16 resolves only 1/256, which would leave (1 - C_ii) coarse.
    """
    with torch.autocast(z1.device.type, enabled=False):
        c = standardize(z1, eps).T @ standardize(z2, eps) / z1.shape[0]
        on_diagonal = (1 - c.diagonal()).pow(2).sum()
        off_diagonal = c.pow(2).sum() - c.diagonal().pow(2).sum()
        return on_diagonal + off_diagonal_weight * off_diagonal
