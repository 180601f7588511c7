"""The single-process reference trainer: the paper's Algorithm 1, one batch through all modules in order.

Its order of operations is the ground truth the asynchronous pipeline must reproduce to the
bit: for every batch t, module 1 steps, then module 2 on module 1's pre-update output, etc.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import ImageData, eval_batches, steps_per_epoch, train_batches
from pipeline.metrics import JsonlLog, ModuleMeter, eval_record, format_eval, train_records
from pipeline.stages import build_local_modules, build_stage_steps
from pipeline.step import StageStep, StepStats


def train_batch(steps: list[StageStep], x: torch.Tensor, y: torch.Tensor) -> list[StepStats]:
    """One batch through every module in order (Algorithm 1): each trains, then passes its output and δ on."""
    delta = None
    stats = []
    for step in steps:
        result = step.train_step(x, delta, y)
        x, delta = result.out, result.delta
        stats.append(result.stats)
    return stats


@torch.no_grad()
def evaluate(steps: list[StageStep], data: ImageData, batch_size: int, device: torch.device) -> dict[str, list[float]]:
    """Top-1 and top-5 test accuracy of every module's head; the last head's is the model's accuracy."""
    correct1 = [0] * len(steps)
    correct5 = [0] * len(steps)
    for x, y in eval_batches(data, batch_size):
        x, y = x.to(device), y.to(device)
        for k, step in enumerate(steps):
            x, logits = step.eval_forward(x)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1[k] += int((top[:, 0] == y).sum())
            correct5[k] += int((top == y[:, None]).any(dim=1).sum())
    n = len(data.test_y)
    return {"test_acc": [c / n for c in correct1], "test_top5": [c / n for c in correct5]}


class SequentialTrainer:
    """Trains a config's local modules in one process and records metrics in a run directory."""

    def __init__(self, cfg: Config, data: ImageData, run_dir: Path | None = None) -> None:
        self.cfg, self.data = cfg, data
        self.device = torch.device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.local = build_local_modules(cfg, data.in_channels, data.num_classes, data.input_size)
        for lm in self.local:
            lm.module.to(self.device)
            lm.head.to(self.device)
        self.steps_per_epoch = steps_per_epoch(data, cfg.batch_size)
        self.steps = build_stage_steps(cfg, self.local, self.steps_per_epoch)
        self.run_dir = Path(run_dir or cfg.out)
        self.log: JsonlLog | None = None

    def run(self) -> dict[str, Any]:
        """Train for the configured epochs (greedy: module after module) and return the final evaluation."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.log = JsonlLog(self.run_dir / "metrics.jsonl")
        start = time.time()
        try:
            if self.cfg.method == "greedy":
                result = self._run_greedy()
            else:
                result = self._run_joint()
        finally:
            self.log.close()
        result["seconds"] = round(time.time() - start, 1)
        (self.run_dir / "summary.json").write_text(json.dumps(result, indent=1))
        return result

    def _batches(self, epoch: int):
        for x, y in train_batches(self.data, epoch, self.cfg.batch_size, self.cfg.seed, self.cfg.augment):
            yield x.to(self.device), y.to(self.device)

    def _run_joint(self) -> dict[str, Any]:
        """All modules train on every batch (bp, layerwise, sgr, reforward)."""
        result: dict[str, Any] = {}
        for epoch in range(self.cfg.epochs):
            meter = ModuleMeter(len(self.steps))
            bar = self._bar(epoch, f"epoch {epoch + 1}/{self.cfg.epochs}")
            for i, (x, y) in enumerate(self._batches(epoch)):
                for k, stats in enumerate(train_batch(self.steps, x, y)):
                    meter.update(k, stats)
                self._after_step(meter, bar, epoch, epoch * self.steps_per_epoch + i + 1)
            bar.close()
            result = self._evaluate(epoch, (epoch + 1) * self.steps_per_epoch, len(self.steps))
        return result

    def _run_greedy(self) -> dict[str, Any]:
        """Greedy layer-wise: module k trains for all epochs on the frozen modules before it, then k+1."""
        result: dict[str, Any] = {}
        for k, step in enumerate(self.steps):
            for epoch in range(self.cfg.epochs):
                meter = ModuleMeter(len(self.steps))
                bar = self._bar(epoch, f"module {k + 1}/{len(self.steps)} epoch {epoch + 1}/{self.cfg.epochs}")
                for i, (x, y) in enumerate(self._batches(epoch)):
                    for frozen in self.steps[:k]:
                        x, _ = frozen.eval_forward(x)
                    meter.update(k, step.train_step(x, None, y).stats)
                    self._after_step(meter, bar, epoch, (k * self.cfg.epochs + epoch) * self.steps_per_epoch + i + 1)
                bar.close()
                result = self._evaluate(epoch, (k * self.cfg.epochs + epoch + 1) * self.steps_per_epoch, k + 1)
        return result

    def _bar(self, epoch: int, desc: str) -> tqdm:
        return tqdm(total=self.steps_per_epoch, desc=desc, disable=not self.cfg.progress, leave=False, dynamic_ncols=True)

    def _after_step(self, meter: ModuleMeter, bar: tqdm, epoch: int, global_step: int) -> None:
        bar.update(1)
        if global_step % self.cfg.log_every == 0 or bar.n == self.steps_per_epoch:
            bar.set_postfix_str(meter.summary(), refresh=False)
            lrs = [s.optimizer.param_groups[0]["lr"] for s in self.steps]
            for record in train_records(meter, epoch, global_step, lrs):
                self.log.write(record)
            meter.reset()

    def _evaluate(self, epoch: int, global_step: int, n_heads: int) -> dict[str, Any]:
        scores = evaluate(self.steps[:n_heads], self.data, self.cfg.eval_batch_size, self.device)
        self.log.write(eval_record(epoch, global_step, scores["test_acc"], scores["test_top5"]))
        print(format_eval(global_step, scores["test_acc"]), flush=True)
        return {"final_test_acc": scores["test_acc"][-1], **scores, "step": global_step}
