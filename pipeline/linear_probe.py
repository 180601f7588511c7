"""Linear probe: a linear classifier trained on the frozen, pooled features of a run's last module.

The standard measure of a self-supervised representation (Barlow Twins' Table 1 protocol, scaled down): the modules
stay as the checkpoint has them; every training and test image's features are computed once (not augmented), then a
linear layer on standardised features trains for a few epochs of SGD with a cosine schedule.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.checkpoint import Checkpoint, write_text_atomic
from pipeline.config import Config
from pipeline.data import Data, bank_batches, eval_batches, to_device
from pipeline.heads import Pool
from pipeline.metrics import JsonlLog
from pipeline.stages import feature_layout
from pipeline.step import StageStep


@torch.no_grad()
def frozen_features(steps: list[StageStep], pool: Pool, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N×D pooled last-module features, N labels) of every batch, through the modules in eval mode."""
    features, labels = [], []
    for x, y in batches:
        for step in steps:
            x = step.eval_output(x)
        features.append(pool(x.float()))
        labels.append(to_device(y, device))
    return torch.cat(features), torch.cat(labels)


def train_linear(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                 epochs: int, lr: float = 0.1, batch_size: int = 256, seed: int = 0,
                 record: Callable[[dict[str, Any]], None] = lambda r: None) -> float:
    """Train a linear classifier on standardised features (the train set's statistics); its final test accuracy.
    `record` gets one record per epoch."""
    (x, y), (x_test, y_test) = train, test
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    g = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():  # drawn from `g`, not the global stream: the probe repeats whatever ran before it
        classifier.weight.uniform_(-x.shape[1] ** -0.5, x.shape[1] ** -0.5, generator=g)
        classifier.bias.zero_()
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    accuracy = 0.0
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=g).to(x.device)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(classifier(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            accuracy = float((classifier(x_test).argmax(dim=1) == y_test).float().mean())
        record({"event": "linear_probe", "epoch": epoch, "train_loss": total / len(y), "test_acc": accuracy})
    return accuracy


def linear_probe(steps: list[StageStep], layout: str, data: Data, batch_size: int, device: torch.device, epochs: int,
                 seed: int = 0, record: Callable[[dict[str, Any]], None] = lambda r: None) -> float:
    """The test accuracy of a linear classifier on the last module's frozen features of every training image."""
    pool = Pool(layout)
    train = frozen_features(steps, pool, bank_batches(data, len(data.train_y), batch_size, device), device)
    test = frozen_features(steps, pool, eval_batches(data, batch_size, device), device)
    return train_linear(train, test, data.num_classes, epochs, seed=seed, record=record)


def probe_checkpoint(cfg: Config, data: Data, checkpoint: Checkpoint, steps: list[StageStep], run_dir: Path,
                     epochs: int, device: torch.device) -> float:
    """Probe a run's checkpoint (its modules restored in `steps`, on `device`): per-epoch records in
    RUN_DIR/linear_probe.jsonl (this probe's only), the result in RUN_DIR/linear_probe.json; returns the accuracy."""
    records = run_dir / "linear_probe.jsonl"
    records.unlink(missing_ok=True)
    log = JsonlLog(records)
    try:
        layout = feature_layout(cfg, data.in_channels, data.num_classes, data.input_size)
        accuracy = linear_probe(steps, layout, data, cfg.eval_batch_size, device, epochs, cfg.seed,
                                record=lambda r: log.write({**r, "step": checkpoint.step}))
    finally:
        log.close()
    result = {"step": checkpoint.step, "test_acc": accuracy, "epochs": epochs}
    write_text_atomic(run_dir / "linear_probe.json", json.dumps(result) + "\n")
    return accuracy
