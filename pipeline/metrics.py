"""Run records: per-module running averages, a JSON-lines log, and a one-line progress summary."""
from __future__ import annotations

import errno
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import RunFileError, disk_full, write_text_atomic
from pipeline.lifeline import interrupts_deferred
from pipeline.step import StepStats


class ModuleMeter:
    """Running sums of each module's loss, SGR term and local accuracy since the last reset.

    The sums stay on the module's device, so a step never waits for the host to read a number:
    the next step's kernels are queued while this one runs. They are read (and checked for
    NaN) only by `averages` and `check_finite`, every `log_every` steps and before a checkpoint.
    """

    def __init__(self, n_modules: int, first_module: int = 0) -> None:
        self.n, self.first_module = n_modules, first_module  # a pipeline stage meters its one module
        self.reset()

    def reset(self) -> None:
        self.loss: list[torch.Tensor | float] = [0.0] * self.n
        self.sgr: list[torch.Tensor | float] = [0.0] * self.n
        self.correct: list[torch.Tensor | int] = [0] * self.n
        self.count = [0] * self.n
        self.steps = [0] * self.n

    def update(self, k: int, stats: StepStats) -> None:
        """Add one step of module k (device tensors, no host sync)."""
        self.loss[k] = self.loss[k] + stats.loss.detach().float()
        self.sgr[k] = self.sgr[k] + stats.sgr.detach().float()
        self.correct[k] = self.correct[k] + stats.correct
        self.count[k] += stats.count
        self.steps[k] += 1

    def check_finite(self) -> list[float]:
        """Each module's summed loss; a NaN or infinite one stops training here, before it reaches a checkpoint."""
        losses = [float(loss) for loss in self.loss]
        for k, loss in enumerate(losses):
            if not math.isfinite(loss):
                raise FloatingPointError(f"module {self.first_module + k + 1}'s loss is {loss}; "
                                         "lower lr or lam, or check the data")
        return losses

    def averages(self) -> dict[str, list[float]]:
        losses = self.check_finite()
        steps = [max(1, s) for s in self.steps]
        return {
            "loss": [l / s for l, s in zip(losses, steps)],
            "sgr": [float(g) / s for g, s in zip(self.sgr, steps)],
            "acc": [int(c) / max(1, n) for c, n in zip(self.correct, self.count)],
        }

    def summary(self) -> str:
        """Compact per-module figures for a progress bar: 'M1 0.41/86% | M2 0.38/87%'."""
        avg = self.averages()
        return " | ".join(
            f"M{k + 1} {avg['loss'][k]:.3f}/{100 * avg['acc'][k]:.0f}%" for k in range(self.n) if self.steps[k]
        )


def topk_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of a batch's samples are right at top-1 and at top-5 (fewer classes: top-all), as device tensors."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return (top[:, 0] == y).sum(), (top == y[:, None]).any(dim=1).sum()


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


def format_eval(step: int, test_acc: list[float], knn: bool = False) -> str:
    """The evaluation's line; `knn`: the modules were scored by k-NN on their features (Barlow Twins), not by heads."""
    heads = "  ".join(f"M{k + 1} {100 * a:.2f}%" for k, a in enumerate(test_acc))
    return f"[eval] step {step}: {'k-NN test accuracy per module' if knn else 'test accuracy per head'}: {heads}"


class JsonlLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl, flushed at every write.

    When TensorBoard is installed (and `tensorboard` is on), the same scalars also go to
    RUN_DIR/tensorboard as event files.
    """

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = path.open("a")
        self.failed = False  # a write failed: its line is still in the file's buffer
        self.board = _summary_writer(path.parent / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        """Append `record`; a full disk is DiskFull, any other failure (the file deleted or moved away with its run
        folder, a read-only or failing disk) a RunFileError naming the file: the run stops instead of logging
        into a file no one can read."""
        with interrupts_deferred():  # whole lines, and TensorBoard's writer thread never left waiting
            try:
                if not self._still_at_its_path():
                    raise RunFileError(errno.ENOENT, f"cannot write {self.path}: it was deleted or moved during the "
                                                     "run (with its run folder?); the run stops here")
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except RunFileError:
                raise
            except OSError as err:
                self.failed = True
                if err.errno == errno.ENOSPC:
                    raise disk_full(self.path) from None
                raise RunFileError(err.errno, f"cannot write {self.path}: {err.strerror}") from None
            if self.board is not None:
                for tag, value in _scalars(record):
                    self.board.add_scalar(tag, value, record["step"])
                self.board.flush()

    def _still_at_its_path(self) -> bool:
        """Whether the open file is still the one at `path` (not deleted, not moved away)."""
        try:
            at_path, opened = os.stat(self.path), os.fstat(self.file.fileno())
        except FileNotFoundError:
            return False
        except OSError as err:  # its folder no longer searchable, or replaced by a file
            raise RunFileError(err.errno, f"cannot write {self.path}: {err.strerror}") from None
        return (at_path.st_dev, at_path.st_ino) == (opened.st_dev, opened.st_ino)

    def close(self) -> None:
        with interrupts_deferred():
            try:
                self.file.close()
            except OSError:
                if not self.failed:  # else: the line of a write that failed, flushed again; that write said why
                    raise
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
    """Drop the records of steps after `step` (written by a run that died after its last checkpoint), and a torn
    last line (with a warning)."""
    if path.exists():
        if path.read_bytes()[-1:] not in (b"", b"\n"):  # the last record has no newline: its write was cut short
            print(f"warning: {path}: dropped a torn last line (a write cut short)", file=sys.stderr, flush=True)
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl file.

    A record is complete once its newline is written: a reader polling a live run can see a
    line still being written, and a killed run or a full disk can leave a torn last line.
    A complete line that is not JSON is an error naming it.
    """
    *complete, _partial = path.read_text(errors="replace").split("\n")
    records = []
    for i, line in enumerate(complete):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path} line {i + 1} is not JSON; the file was edited or damaged") from None
    return records
