"""ΔL_k, the paper's Figure 3: how much the earlier modules' updates changed module k's loss.

On a fixed probe batch, module k's loss is computed with its current weights on the input the
earlier modules give now and on the input they gave at the previous probe; the difference is
ΔL_k. A positive ΔL_k means the earlier modules' updates moved module k's input in a
direction that hurts module k: the gradient conflict SGR is meant to reduce.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.step import StageStep


class InputDriftProbe:
    """Remembers module k's probe input between probes and reports ΔL_k at each one."""

    def __init__(self) -> None:
        self.previous_input: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, step: StageStep, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """Module k's output on the probe input (for module k+1) and ΔL_k (None at the first probe)."""
        out, logits = step.eval_forward(x)
        delta_loss = None
        if self.previous_input is not None:
            _, old_logits = step.eval_forward(self.previous_input)
            delta_loss = float(F.cross_entropy(logits, y) - F.cross_entropy(old_logits, y))
        self.previous_input = x.clone()
        return out, delta_loss
