"""The SGR regulariser: pure tensor math, no modules, optimizers or I/O.

Successive Gradient Reconciliation compares, per sample, the direction of the gradient of
module k's loss w.r.t. its input with the gradient the previous module's loss had w.r.t.
that same tensor (see docs/sgr-method.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sample", "none")
NORM_EPS = 1e-12


def normalize_per_sample(grad: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Flatten each sample's gradient and divide it by its L2 norm (an all-zero row stays zero).

    Always in float32: gradients may arrive in bfloat16 or float16 (activations and δ travel in
    the compute dtype), and in float16 the eps would round to 0 and turn a zero row into NaN.
    """
    return F.normalize(grad.reshape(grad.shape[0], -1).float(), p=2.0, dim=1, eps=eps)


def sgr_term(grad_now: torch.Tensor, grad_prev: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """SGR term between this module's input gradient and the previous module's output gradient.

    reduction:
      - "mean": the paper's MSE, averaged over batch and features; its size is about
        (2 - 2cos)/D for a per-sample input of D elements, so λ's strength depends on D.
      - "sample": squared distance summed over features, averaged over the batch
        (= mean of 2 - 2cos), independent of D.
      - "none": the per-sample squared distances, shape (batch,).
    """
    if grad_now.shape != grad_prev.shape:
        raise ValueError(f"SGR needs equal gradient shapes, got {tuple(grad_now.shape)} and {tuple(grad_prev.shape)}")
    diff_sq = (normalize_per_sample(grad_now) - normalize_per_sample(grad_prev)).pow(2)
    if reduction == "mean":
        return diff_sq.mean()
    if reduction == "sample":
        return diff_sq.sum(dim=1).mean()
    if reduction == "none":
        return diff_sq.sum(dim=1)
    raise ValueError(f"unknown SGR reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
