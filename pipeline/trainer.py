"""The single-process reference trainer: the paper's Algorithm 1, one batch through all modules in order.

Its order of operations is the ground truth the asynchronous pipeline must reproduce to the
bit: for every batch t, module 1 steps, then module 2 on module 1's pre-update output, etc.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.bpfree import NEEDS_OUTPUT_ERROR, dfa_signal, pepita_input, pepita_signal, prediction_error
from pipeline.checkpoint import (Checkpoint, CheckpointError, check_finite, checkpoint_dir, fingerprint, load_stage_state,
                                 save_atomic, stage_state)
from pipeline.config import Config, barlow_twins_losses, knn_bank_size
from pipeline.data import Data, bank_batches, eval_batches, probe_batch, steps_per_epoch, to_device
from pipeline.metrics import ModuleMeter, eval_record, format_eval, topk_correct, train_records
from pipeline.probe import InputDriftProbe
from pipeline.rundir import RunWriter
from pipeline.schedule import config_batches, run_epochs
from pipeline.stages import build_local_modules, build_stage_steps, configure_torch, cuts_of
from pipeline.step import SignalStep, StageStep, StepStats


def train_batch(steps: list[StageStep], x: torch.Tensor, y: torch.Tensor,
                image: torch.Tensor | None = None) -> list[StepStats]:
    """One batch through every module in order (Algorithm 1): each trains, then passes its output and δ on (InfoPro's
    modules also get the batch's `image`)."""
    delta = None
    stats = []
    for step in steps:
        result = step.train_step(x, delta, y, image if step.needs_image else None)
        x, delta = result.out, result.delta
        stats.append(result.stats)
    return stats


def feedback_batch(steps: list[SignalStep], x: torch.Tensor, y: torch.Tensor) -> list[StepStats]:
    """FA / DFA: one forward through every layer, the output error, then each layer updated by its fed-back signal.

    The last layer learns from its own loss through its fixed head; layer k < K from the
    signal layer k+1 passes down through a fixed matrix (fa) or from the output error (dfa).
    """
    outs = []
    for step in steps:
        outs.append(step.forward(x))
        x = outs[-1].detach()
    signal, error = steps[-1].output_signal(outs[-1], y)
    stats: list[StepStats] = []
    for k in reversed(range(len(steps))):
        step = steps[k]
        if step.method == "dfa" and k < len(steps) - 1:
            signal = dfa_signal(error, step.output_feedback(outs[k]), outs[k].shape)
        down = step.fa_down(outs[k], signal) if step.method == "fa" and k > 0 else None
        stats.insert(0, step.apply(outs[k], signal, y).stats)
        signal = down
    return stats


def pepita_batch(steps: list[SignalStep], x: torch.Tensor, y: torch.Tensor) -> list[StepStats]:
    """PEPITA: a clean forward and its output error, a forward of the input perturbed by the error through the fixed
    F, then each hidden layer updated from its two activations' difference and the last from its loss gradient."""
    clean = []
    with torch.no_grad():
        h = x
        for step in steps:
            h = step.forward(h)
            clean.append(h)
    last = clean[-1].requires_grad_()
    signal, _ = steps[-1].output_signal(last, y)
    error = prediction_error(steps[-1].head(last.detach()).float(), y)
    h = pepita_input(x, error, steps[0].input_feedback(x))
    stats = []
    for k, step in enumerate(steps):
        modulated = step.forward(h)  # keeps its pre-activation, where the signal enters
        layer_signal = signal if k == len(steps) - 1 else pepita_signal(clean[k], modulated.detach())
        stats.append(step.apply(clean[k].detach(), layer_signal, y, at=step.pre).stats)
        h = modulated.detach()
    return stats


@torch.no_grad()
def evaluate(steps: list[StageStep], data: Data, batch_size: int, device: torch.device,
             bank: int = 0) -> dict[str, list[float]]:
    """Top-1 and top-5 test accuracy of every module's head (the last head's is the model's accuracy); with `bank`,
    that many training images (data.bank_batches) go through first, for modules scored by k-NN."""
    for x, y in bank_batches(data, bank, batch_size, device):
        y = to_device(y, device)
        for step in steps:
            x = step.remember(x, y)
    correct1: list[torch.Tensor | int] = [0] * len(steps)  # on the device: read once, at the end
    correct5: list[torch.Tensor | int] = [0] * len(steps)
    for x, y in eval_batches(data, batch_size, device):
        y = to_device(y, device)
        for k, step in enumerate(steps):
            x, logits = step.eval_forward(x)
            top1, top5 = topk_correct(logits, y)
            correct1[k] += top1
            correct5[k] += top5
    for step in steps:
        step.forget()
    n = len(data.test_y)
    return {"test_acc": [int(c) / n for c in correct1], "test_top5": [int(c) / n for c in correct5]}


class SequentialTrainer:
    """Trains a config's local modules in one process and records metrics and checkpoints in a run directory."""

    def __init__(self, cfg: Config, data: Data, run_dir: Path | None = None, resume: Checkpoint | None = None) -> None:
        self.cfg, self.data = cfg, data
        self.device = torch.device(cfg.device)
        configure_torch(cfg, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.local = build_local_modules(cfg, data.in_channels, data.num_classes, data.input_size)
        for lm in self.local:
            lm.module.to(self.device)
            lm.head.to(self.device)
        self.steps_per_epoch = steps_per_epoch(data, cfg.batch_size)
        self.steps = build_stage_steps(cfg, self.local, self.steps_per_epoch)
        self.run_dir = Path(run_dir or cfg.out)
        self.fingerprint = fingerprint(cfg, cuts_of(self.local))
        self.probes = [InputDriftProbe() for _ in self.steps]
        self.probe = probe_batch(data, cfg.probe_size, self.device) if cfg.probe_size else None
        self.start_step = 0
        if resume is not None:
            if cfg.method == "greedy":
                raise CheckpointError("greedy runs cannot be resumed: start the run again without --resume")
            for k, (step, probe) in enumerate(zip(self.steps, self.probes)):
                probe.previous_input = load_stage_state(step, resume.stage_file(k), self.device)
            self.start_step = resume.step
        self.writer: RunWriter | None = None

    def run(self) -> dict[str, Any]:
        """Train for the configured epochs (greedy: module after module) and return the final evaluation."""
        self.writer = RunWriter(self.cfg, self.run_dir, self.start_step)
        start = time.time()
        try:
            if self.cfg.method == "greedy":
                result = self._run_greedy()
            else:
                result = self._run_joint()
        finally:
            self.writer.close()
        result["seconds"] = round(time.time() - start, 1)
        self.writer.summary(result)
        return result

    def _batches(self, epoch: int, start: int = 0):
        for x, y in config_batches(self.cfg, self.data, epoch, start, self.device):
            yield x, to_device(y, self.device)

    def _run_joint(self) -> dict[str, Any]:
        """All modules train on every batch (bp, layerwise, sgr, reforward); evaluations and checkpoints as due."""
        result: dict[str, Any] = {}
        for epoch, trained, steps in run_epochs(self.cfg, self.data, self.steps_per_epoch, self.start_step, self.device):
            meter = ModuleMeter(len(self.steps))
            bar = self._bar(epoch, f"epoch {epoch + 1}/{self.cfg.epochs}")
            bar.update(trained)
            for s in steps:
                y = to_device(s.y, self.device)
                if self.cfg.method == "pepita":
                    batch_stats = pepita_batch(self.steps, s.x, y)
                elif self.cfg.method in NEEDS_OUTPUT_ERROR:
                    batch_stats = feedback_batch(self.steps, s.x, y)
                else:
                    batch_stats = train_batch(self.steps, s.x, y, s.image)
                for k, stats in enumerate(batch_stats):
                    meter.update(k, stats)
                self._after_step(meter, bar, epoch, s.step)
                if s.evaluate:
                    result = self._evaluate(epoch, s.step, len(self.steps))
                if s.checkpoint:
                    meter.check_finite()  # a NaN since the last log must not reach a sealed checkpoint
                    self._checkpoint(epoch, s.step, result)
            bar.close()
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
        self._checkpoint(self.cfg.epochs - 1, result["step"], result)
        return result

    def _bar(self, epoch: int, desc: str) -> tqdm:
        return tqdm(total=self.steps_per_epoch, desc=desc, disable=not self.cfg.progress, leave=False, dynamic_ncols=True)

    def _after_step(self, meter: ModuleMeter, bar: tqdm, epoch: int, global_step: int) -> None:
        bar.update(1)
        if global_step % self.cfg.log_every == 0 or bar.n == self.steps_per_epoch:
            bar.set_postfix_str(meter.summary(), refresh=False)
            lrs = [s.optimizer.param_groups[0]["lr"] for s in self.steps]
            for record in train_records(meter, epoch, global_step, lrs):
                self.writer.record(record)
            meter.reset()

    def _evaluate(self, epoch: int, global_step: int, n_heads: int) -> dict[str, Any]:
        """Every head's test accuracy, and ΔL_k on the probe batch, after training step `global_step`."""
        scores = evaluate(self.steps[:n_heads], self.data, self.cfg.eval_batch_size, self.device, knn_bank_size(self.cfg))
        delta_loss: list[float | None] = [None] * n_heads
        if self.probe is not None and n_heads == len(self.steps):
            x, y = self.probe[0], to_device(self.probe[1], self.device)
            for k, (step, probe) in enumerate(zip(self.steps, self.probes)):
                x, delta_loss[k] = probe(step, x, y)
        self.writer.record(eval_record(epoch, global_step, scores["test_acc"], scores["test_top5"], delta_loss))
        print(format_eval(global_step, scores["test_acc"], knn=barlow_twins_losses(self.cfg)), flush=True)
        return {"final_test_acc": scores["test_acc"][-1], **scores, "step": global_step}

    def _checkpoint(self, epoch: int, global_step: int, result: dict[str, Any]) -> None:
        """Every module's state after `global_step`, sealed with a manifest; older checkpoints pruned."""
        path = checkpoint_dir(self.run_dir, global_step)
        for k, step in enumerate(self.steps):
            check_finite(step, k + 1)
        for k, (step, probe) in enumerate(zip(self.steps, self.probes)):
            save_atomic(stage_state(step, self.device, probe.previous_input), path / f"stage{k + 1}.pt")
        test_acc = result["final_test_acc"] if result.get("step") == global_step else None
        self.writer.seal(global_step, epoch, self.fingerprint, len(self.steps), test_acc)
