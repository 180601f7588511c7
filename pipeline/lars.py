"""LARS (You et al. 2017), as Barlow Twins trains with it: no library in this project's dependencies has it.

Per weight tensor: the gradient plus weight decay is rescaled to η·‖w‖/‖g‖ of the weight's norm (the trust
ratio), then heavy-ball momentum. Biases and BatchNorm parameters (1-D tensors) take neither weight decay nor the
trust ratio, and a smaller learning rate (`split_for_lars`), as in the Barlow Twins code.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

# Barlow Twins' learning rates: 0.2 for weights and 0.0048 for biases and BatchNorm, both × batch / 256.
BIAS_LR_RATIO = 0.0048 / 0.2


def split_for_lars(params: Iterable[nn.Parameter]) -> list[dict[str, Any]]:
    """Two parameter groups: weights (adapted, decayed) and 1-D tensors (neither, at BIAS_LR_RATIO of the lr)."""
    params = list(params)
    weights = [p for p in params if p.dim() > 1]
    others = [p for p in params if p.dim() <= 1]
    return [{"params": weights}, {"params": others, "lars": False, "lr_ratio": BIAS_LR_RATIO}]


class LARS(torch.optim.Optimizer):
    """g ← ∇ + wd·w;  g ← g · η‖w‖/‖g‖ (1 where either norm is 0);  μ ← m·μ + g;  w ← w - lr·lr_ratio·μ.

    A group with `lars: False` skips the weight decay and the trust ratio.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "lars": True,
                    "lr_ratio": 1.0}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = p.norm(), g.norm()
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(g)
                p.add_(buffer, alpha=-group["lr"] * group["lr_ratio"])
