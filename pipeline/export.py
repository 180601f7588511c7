"""From a run directory's checkpoint to ordinary PyTorch: the stitched model, its export, its evaluation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.checkpoint import Checkpoint, load_stage_state
from pipeline.config import Config, from_dict
from pipeline.data import Data, steps_per_epoch
from pipeline.rundir import RUN_OUTPUTS, is_run_dir
from pipeline.stages import LocalModule, build_local_modules, build_stage_steps
from pipeline.step import StageStep


def stitch(local: list[LocalModule]) -> nn.Sequential:
    """The whole network for inference: every module's units in order, then the last module's head."""
    return nn.Sequential(*(unit for lm in local for unit in lm.module), local[-1].head)


def inference_model(cfg: Config, in_channels: int, num_classes: int, input_size: int) -> nn.Sequential:
    """The model builder for exported weights: the config's network, stitched, freshly initialised."""
    return stitch(build_local_modules(cfg, in_channels, num_classes, input_size))


def restore_steps(cfg: Config, data: Data, checkpoint: Checkpoint,
                  device: torch.device) -> tuple[list[LocalModule], list[StageStep]]:
    """Every module of a run, with the weights of a checkpoint."""
    local = build_local_modules(cfg, data.in_channels, data.num_classes, data.input_size)
    for lm in local:
        lm.module.to(device)
        lm.head.to(device)
    steps = build_stage_steps(cfg, local, steps_per_epoch(data, cfg.batch_size))
    for k, step in enumerate(steps):
        load_stage_state(step, checkpoint.stage_file(k), device)
    return local, steps


def exported_model(cfg: Config, data: Data, checkpoint: Checkpoint) -> dict[str, Any]:
    """The checkpoint's network as one state dict for `inference_model`, with what is needed to rebuild it and the
    input normalisation it was trained with: what `launch.py export` writes (with `save_atomic`: no torn file)."""
    local, _ = restore_steps(cfg, data, checkpoint, torch.device("cpu"))
    return {
        "config": cfg.to_dict(), "step": checkpoint.step, "in_channels": data.in_channels,
        "num_classes": data.num_classes, "input_size": data.input_size, "state_dict": stitch(local).state_dict(),
        "mean": data.mean, "std": data.std,  # inputs are (uint8 / 255 - mean) / std per channel, as in training
    }


class ExportError(ValueError):
    """An export target that cannot or must not be written; the message says which and why."""


def export_path(run_dir: Path, to: str | None) -> Path:
    """Where `launch.py export` writes: `to`, or RUN_DIR/model.pt; ExportError (one line) for a path that would
    overwrite what the run keeps (its checkpoints, config, records) or cannot be written."""
    path = Path(to) if to else run_dir / "model.pt"
    target, own = path.resolve(), run_dir.resolve()
    if path.is_dir():
        raise ExportError(f"--to {path} is a folder; name a file, e.g. {path / 'model.pt'}")
    if path.exists() and not path.is_file():  # the rename of save_atomic would replace a device or socket by a file
        raise ExportError(f"--to {path} is not a regular file (a device or a socket); name a file")
    for run in (run for run in target.parents if is_run_dir(run)):  # this run, or another one
        kept = [run / name for name in ("config.yaml", *RUN_OUTPUTS) if name != "model.pt"]  # export's own may go
        if any(target == p or p in target.parents for p in kept):
            whose = "the run's own" if run == own else f"the run {run}'s"
            raise ExportError(f"--to {path} would overwrite {whose} {target.relative_to(run)}; name another file")
    if not target.parent.is_dir():
        kind = "is a file, not a folder" if target.parent.exists() else "does not exist"
        raise ExportError(f"--to {path}: the folder {path.parent} {kind}; create it or name another file")
    if not os.access(target.parent, os.W_OK):
        if to is None:
            raise ExportError(f"the run directory {run_dir} is not writable; export elsewhere with --to FILE")
        raise ExportError(f"--to {path}: the folder {path.parent} is not writable; name another file")
    return path


def load_exported(path: Path) -> nn.Sequential:
    """An exported model, ready for inference (weights_only: no code runs on load)."""
    exported = torch.load(path, map_location="cpu", weights_only=True)
    cfg = from_dict(exported["config"])
    model = inference_model(cfg, exported["in_channels"], exported["num_classes"], exported["input_size"])
    model.load_state_dict(exported["state_dict"])
    return model.eval()
