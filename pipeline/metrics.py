"""Run records: per-module running averages, a JSON-lines log, and a one-line progress summary."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.step import StepStats


class ModuleMeter:
    """Running sums of each module's loss, SGR term and local accuracy since the last reset."""

    def __init__(self, n_modules: int, first_module: int = 0) -> None:
        self.n, self.first_module = n_modules, first_module  # a pipeline stage meters its one module
        self.reset()

    def reset(self) -> None:
        self.loss = [0.0] * self.n
        self.sgr = [0.0] * self.n
        self.correct = [0] * self.n
        self.count = [0] * self.n
        self.steps = [0] * self.n

    def update(self, k: int, stats: StepStats) -> None:
        """Add one step of module k; a NaN or infinite loss stops training here, before it reaches a checkpoint."""
        loss = float(stats.loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"module {self.first_module + k + 1}'s loss is {loss}; lower lr or lam, or check the data")
        self.loss[k] += loss
        self.sgr[k] += float(stats.sgr)
        self.correct[k] += int(stats.correct)
        self.count[k] += stats.count
        self.steps[k] += 1

    def averages(self) -> dict[str, list[float]]:
        steps = [max(1, s) for s in self.steps]
        return {
            "loss": [l / s for l, s in zip(self.loss, steps)],
            "sgr": [g / s for g, s in zip(self.sgr, steps)],
            "acc": [c / max(1, n) for c, n in zip(self.correct, self.count)],
        }

    def summary(self) -> str:
        """Compact per-module figures for a progress bar: 'M1 0.41/86% | M2 0.38/87%'."""
        avg = self.averages()
        return " | ".join(
            f"M{k + 1} {avg['loss'][k]:.3f}/{100 * avg['acc'][k]:.0f}%" for k in range(self.n) if self.steps[k]
        )


def train_records(meter: ModuleMeter, epoch: int, step: int, lrs: list[float]) -> list[dict[str, Any]]:
    """One `train` record per module that stepped since the meter's last reset (modules numbered from 1)."""
    avg = meter.averages()
    return [
        {"event": "train", "module": meter.first_module + k + 1, "epoch": epoch, "step": step,
         "loss": avg["loss"][k], "sgr": avg["sgr"][k], "acc": avg["acc"][k], "lr": lrs[k]}
        for k in range(meter.n) if meter.steps[k]
    ]


def eval_record(epoch: int, step: int, test_acc: list[float], test_top5: list[float],
                delta_loss: list[float | None]) -> dict[str, Any]:
    """The `eval` record after training step `step`: every head's top-1/top-5 test accuracy and ΔL_k."""
    return {"event": "eval", "epoch": epoch, "step": step, "test_acc": test_acc, "test_top5": test_top5,
            "delta_loss": delta_loss}


def format_eval(step: int, test_acc: list[float]) -> str:
    heads = "  ".join(f"M{k + 1} {100 * a:.2f}%" for k, a in enumerate(test_acc))
    return f"[eval] step {step}: test accuracy per head: {heads}"


class JsonlLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl, flushed at every write.

    When TensorBoard is installed (and `tensorboard` is on), the same scalars also go to
    RUN_DIR/tensorboard as event files.
    """

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        self.board = _summary_writer(path.parent / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for tag, value in _scalars(record):
                self.board.add_scalar(tag, value, record["step"])
            self.board.flush()

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _summary_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(log_dir))


def _scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """TensorBoard tags of a record: per module for train records, per head for eval records."""
    if record["event"] == "train":
        m = record["module"]
        return [(f"train/{key}/module{m}", record[key]) for key in ("loss", "sgr", "acc", "lr")]
    scalars = [(f"test_acc/head{k + 1}", a) for k, a in enumerate(record["test_acc"])]
    scalars += [(f"delta_loss/module{k + 1}", d) for k, d in enumerate(record["delta_loss"]) if d is not None]
    return scalars


def truncate_after(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (written by a run that died after its last checkpoint)."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl file.

    A record is complete once its newline is written: a reader polling a live run can see a
    line still being written, and a killed run can leave a torn last line.
    """
    complete = path.read_text().split("\n")[:-1]  # after the last newline: nothing, or a partial record
    return [json.loads(line) for line in complete if line.strip()]
