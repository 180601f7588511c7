"""One local training step of one module: the exact per-batch update of docs/sgr-method.md.

The same `StageStep` runs in the single-process reference trainer and in a stage process of
the asynchronous pipeline; both call `train_step` on batches in the same order, which is
why the two compute the same numbers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.sgr import sgr_term


@dataclass
class StepStats:
    """Statistics of one step, kept as 0-dim tensors so no device sync happens inside the step."""

    loss: torch.Tensor  # classification loss of the local head
    sgr: torch.Tensor  # SGR term (0 where the module has none)
    correct: torch.Tensor  # number of samples the local head classified right
    count: int  # batch size


@dataclass
class StepOutput:
    """What a module hands to the next one: its detached output and δ, plus its statistics."""

    out: torch.Tensor | None  # detached output (None for the last module)
    delta: torch.Tensor | None  # ∂L_cls/∂out, detached (None when the next module needs none)
    stats: StepStats


class StageStep:
    """Trains one module and its local head with its own optimizer and learning-rate schedule.

    lam > 0 adds the SGR term against the δ received from the previous module; lam = 0 is
    non-greedy layer-wise training. `reforward` recomputes the output after the update.
    `amp` runs the forward passes and losses under bfloat16 autocast; gradients, the SGR
    term and the tensors passed between modules stay fp32. `channels_last` keeps conv maps NHWC in memory.
    """

    def __init__(
        self,
        module: nn.Module,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        lam: float = 0.0,
        is_first: bool,
        is_last: bool,
        send_delta: bool,
        reforward: bool = False,
        sgr_reduction: str = "mean",
        track_sgr: bool = False,
        amp: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.module, self.head = module, head
        self.amp, self.channels_last = amp, channels_last
        if channels_last:
            module.to(memory_format=torch.channels_last)
            head.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.lam, self.reduction = lam, sgr_reduction
        self.is_first, self.is_last = is_first, is_last
        self.send_delta, self.reforward = send_delta, reforward
        self.track_sgr = track_sgr and not is_first

    @property
    def needs_delta(self) -> bool:
        """Whether this module must receive the previous module's δ with its input."""
        return not self.is_first and (self.lam > 0 or self.track_sgr)

    def train_step(self, x: torch.Tensor, delta_prev: torch.Tensor | None, y: torch.Tensor) -> StepOutput:
        """One update of this module on one batch (Algorithm 1, one k)."""
        self.module.train()
        self.head.train()
        use_sgr = self.lam > 0 and not self.is_first
        if self.needs_delta and delta_prev is None:
            raise ValueError("this module uses SGR but received no δ from the previous module")
        x = self.prepare(x).requires_grad_(self.needs_delta)
        # SGR differentiates δ, a gradient, again: the fused attention kernels have no double backward
        math_attention = sdpa_kernel(SDPBackend.MATH) if use_sgr else contextlib.nullcontext()
        with self.autocast(x), math_attention:
            out = self.module(x)
            logits = self.head(out)
            loss_cls = F.cross_entropy(logits, y)
        loss = loss_cls
        sgr = torch.zeros((), device=loss_cls.device)
        if self.needs_delta:
            (delta_now,) = torch.autograd.grad(loss_cls, x, create_graph=use_sgr, retain_graph=True)
            sgr = sgr_term(delta_now, delta_prev, self.reduction)
            if use_sgr:
                loss = loss_cls + self.lam * sgr
        delta_out = None
        if self.send_delta and not self.is_last:
            (delta_out,) = torch.autograd.grad(loss_cls, out, retain_graph=True)
            delta_out = delta_out.detach().float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        passed_on = None
        if not self.is_last:
            if self.reforward:
                with torch.no_grad(), self.autocast(x):
                    passed_on = self.module(x.detach())
            else:
                passed_on = out.detach()
            passed_on = passed_on.float()
        stats = StepStats(
            loss=loss_cls.detach(),
            sgr=sgr.detach(),
            correct=(logits.detach().argmax(dim=1) == y).sum(),
            count=y.shape[0],
        )
        return StepOutput(out=passed_on, delta=delta_out, stats=stats)

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference through this module and its head: (output, logits)."""
        self.module.eval()
        self.head.eval()
        with self.autocast(x):
            x = self.prepare(x)
            out = self.module(x)
            logits = self.head(out)
        return out.float(), logits.float()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A received input, detached, in this module's memory format."""
        x = x.detach()
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self, x: torch.Tensor) -> torch.autocast:
        """bfloat16 autocast on x's device when amp is on; a no-op otherwise."""
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.amp)
