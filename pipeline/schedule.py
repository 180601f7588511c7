"""The run's loop, in one place: which training batches come in which epoch, and what is due after each.

The sequential trainer and the pipeline's first stage both walk this sequence, so they train on
the same batches and evaluate and checkpoint after the same steps by construction; a resumed run
starts at the first batch not yet trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from pipeline.config import Config, infopro_losses, views_per_image
from pipeline.data import Data, Part, pixels, stats_on, train_batches


@dataclass(frozen=True)
class ScheduledStep:
    """One training batch of the run and what follows it."""

    epoch: int
    step: int  # 1-based, counted over the whole run
    x: torch.Tensor  # on the device, normalised
    y: torch.Tensor  # labels, on the CPU
    evaluate: bool  # an evaluation is due after this step
    checkpoint: bool  # a checkpoint is due after this step
    image: torch.Tensor | None = None  # InfoPro's losses: the uint8 images of x, on its device


def is_due(every: int, step: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether an every-N-steps event (evaluation, checkpoint) happens after `step`; 0 means each epoch's end."""
    if step == total_steps:
        return True
    return step % (every or steps_per_epoch) == 0


def run_epochs(cfg: Config, data: Data, steps_per_epoch: int, start_step: int = 0, device: torch.device | None = None,
               part: Part = None) -> Iterator[tuple[int, int, Iterator[ScheduledStep]]]:
    """Per epoch from the one holding step `start_step` + 1: (epoch, batches of it already trained, its steps); with
    `part`, each step's images are only that part's rows (data.train_batches)."""
    total = steps_per_epoch * cfg.epochs
    for epoch in range(start_step // steps_per_epoch, cfg.epochs):
        skip = max(0, start_step - epoch * steps_per_epoch)  # batches a resumed run trained on
        yield epoch, skip, _steps(cfg, data, epoch, skip, steps_per_epoch, total, device, part)


def _steps(cfg: Config, data: Data, epoch: int, skip: int, steps_per_epoch: int, total: int,
           device: torch.device | None, part: Part) -> Iterator[ScheduledStep]:
    batches = train_batches(data, epoch, cfg.batch_size, cfg.seed, cfg.augment, skip, device, part,
                            views_per_image(cfg))
    for i, (x, y) in enumerate(batches, start=skip):
        step = epoch * steps_per_epoch + i + 1
        yield ScheduledStep(epoch, step, x, y, is_due(cfg.eval_every, step, steps_per_epoch, total),
                            is_due(cfg.checkpoint_every, step, steps_per_epoch, total),
                            pixels(x, *stats_on(data, x.device)) if infopro_losses(cfg) else None)
