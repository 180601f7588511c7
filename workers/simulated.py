"""A stage whose compute is a fixed sleep: measures the pipeline's schedule overhead apart from the cores.

`bench/schedule_overhead.py` sets `simulate_step_ms`; every stage then sleeps instead of
training, so K stages overlap perfectly in the ideal schedule even on a machine with fewer
than K cores, and whatever throughput is lost is the pipeline's own (messages, credits, Python).
"""
from __future__ import annotations

import time

import torch

from pipeline.step import StageStep, StepOutput, StepStats


class SimulatedStep:
    """Stands in for a StageStep: sleeps `ms` per training batch and passes a copy of its input on.

    A copy, because a stage sends only tensors it made: a CUDA tensor received by IPC cannot be shared again.
    """

    def __init__(self, step: StageStep, ms: float) -> None:
        self.step, self.seconds = step, ms / 1000
        self.optimizer = step.optimizer  # StageWorker reports its learning rate
        self.needs_image = step.needs_image  # the run loop hands it the images the real step would get

    def train_step(self, x: torch.Tensor, delta_prev: torch.Tensor | None, y: torch.Tensor,
                   image: torch.Tensor | None = None) -> StepOutput:
        """Sleep for the simulated compute, then hand x on (with a zero δ where the next stage needs one)."""
        time.sleep(self.seconds)
        if self.step.average_gradients is not None:  # replicas: the collective a real step ends with, on zero gradients
            params = self.step.parameters()
            for param in params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            self.step.average_gradients(params)
        last = self.step.is_last
        delta = torch.zeros_like(x) if self.step.send_delta and not last else None
        zero = torch.zeros(())
        stats = StepStats(loss=zero, sgr=zero, correct=torch.zeros((), dtype=torch.long), count=y.shape[0])
        return StepOutput(out=None if last else x.clone(), delta=delta, stats=stats)

    def remember(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A k-NN bank batch: no compute, a copy of x passes on."""
        return x.clone()

    def forget(self) -> None:
        """Nothing was kept."""

    def eval_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """No compute: a copy of x passes on, with one-class zero logits (simulated accuracy means nothing)."""
        return x.clone(), torch.zeros(x.shape[0], 1, device=x.device)
