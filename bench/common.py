"""Shared pieces of the benchmark scripts: arguments, configs, timing, pipeline runs, tables and result files.

Every script builds its models with the project's own Config and build functions and runs
them with the project's own step, trainer and launcher code; nothing here trains on its own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from pipeline.config import Config, validate
from pipeline.data import Data, data_shape, load_config_data, steps_per_epoch
from pipeline.plan import median_seconds
from pipeline.schedule import run_epochs
from pipeline.stages import build_local_modules, build_stage_steps
from pipeline.step import StageStep
from pipeline.trainer import evaluate, train_batch
from workers import launcher
from workers.simulated import SimulatedStep

ROOT = Path(__file__).resolve().parents[1]


def at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `least` (anything else is argparse's one-line usage error)."""
    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return number


def positive_ms(text: str) -> float:
    """An argparse type: a finite number of milliseconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of ms, got {text}")
    return value


def names_of(text: str, known: Iterable[str], what: str) -> list[str]:
    """A comma-separated list of names from `known` (argparse's type for --models and --methods)."""
    names, known = text.split(","), sorted(set(known))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def parser(name: str, description: str, threads: int | None = None) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --quick, --smoke, --out and --threads."""
    p = argparse.ArgumentParser(prog=f"bench/{name}.py", description=description)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU")
    size.add_argument("--smoke", action="store_true", help="the smallest size, seconds (used by tests)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / name), help="folder for results.json and plots")
    p.add_argument("--threads", type=at_least(1), default=threads or os.cpu_count() or 1,
                   help="torch threads of the single-process measurements (default: %(default)s)")
    return p


def size_of(args: argparse.Namespace) -> str:
    """The run size picked on the command line: smoke, quick or full."""
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def bench_config(**overrides: Any) -> Config:
    """The benchmarks' base config: ResNet-32 on synthetic 3×32×32 images, batch 128, CPU, quiet.

    Evaluation stays at each epoch's end (the one-process loop does the same); the ΔL_k probe
    is off and the only checkpoint is the last step's, so the timed steps are training steps.
    """
    values = dict(dataset="synthetic", image_size=32, model="resnet32", batch_size=128, method="sgr", lam=1.0,
                  epochs=1, progress=False, peer_timeout=60.0, probe_size=0, checkpoint_every=1_000_000_000)
    values.update(overrides)
    return validate(Config(**values))


def bench_data(cfg: Config) -> Data:
    """The config's dataset (synthetic: 512 training and 128 test images, so 4 batches of 128 per epoch)."""
    return load_config_data(cfg)


def build_steps(cfg: Config, data: Data, device: str = "cpu") -> list[StageStep]:
    """The config's modules as StageSteps, built exactly as the trainer and the stage processes build them."""
    local = build_local_modules(cfg, data.in_channels, data.num_classes, data.input_size)
    for lm in local:
        lm.module.to(device)
        lm.head.to(device)
    return build_stage_steps(cfg, local, steps_per_epoch(data, cfg.batch_size))


def stage_inputs(steps: list[StageStep], x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each module's (input, δ) for one batch, from one training step of every module in order."""
    inputs, delta = [], None
    for step in steps:
        inputs.append((x, delta))
        result = step.train_step(x, delta, y)
        x, delta = result.out, result.delta
    return inputs


def stage_step_seconds(steps: list[StageStep], x: torch.Tensor, y: torch.Tensor, reps: int) -> list[float]:
    """Median seconds of each module's train_step on its own input for one batch (one process)."""
    inputs = stage_inputs(steps, x, y)

    def one_step(step: StageStep, inp: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        step.train_step(inp[0], inp[1], y)
        if x.device.type == "cuda":  # kernels run asynchronously: time them, not their launches
            torch.cuda.synchronize(x.device)
    return [median_seconds(lambda s=step, i=inp: one_step(s, i), reps) for step, inp in zip(steps, inputs)]


def one_process(cfg: Config, warmup: int, epochs: int) -> float:
    """Training samples/s of the sequential reference's loop (the run loop's batches through train_batch, then evaluate,
    per epoch) after `warmup` epochs.

    With `simulate_step_ms` every module sleeps instead of training, as the stage processes do.
    """
    cfg = bench_config(**{**cfg.to_dict(), "epochs": warmup + epochs})
    data = bench_data(cfg)
    steps = build_steps(cfg, data)
    if cfg.simulate_step_ms > 0:
        steps = [SimulatedStep(step, cfg.simulate_step_ms) for step in steps]
    spe = steps_per_epoch(data, cfg.batch_size)
    start = time.perf_counter()
    for epoch, _, batches in run_epochs(cfg, data, spe):
        if epoch == warmup:
            start = time.perf_counter()
        for s in batches:
            train_batch(steps, s.x, s.y)
        evaluate(steps, data, cfg.eval_batch_size, torch.device("cpu"))
    return epochs * spe * cfg.batch_size / (time.perf_counter() - start)


def run_pipeline(cfg: Config, warmup_steps: int) -> dict[str, Any]:
    """Run the spawned K-process pipeline and measure its steady state, after `warmup_steps`, from the stages' reports.

    Each stage reports its cumulative busy and idle seconds with its train records; the
    coordinator times them as they arrive (its `timeline`). Between the last stage's first report at or
    after `warmup_steps` and its last report, the run is past start-up and pipeline fill.
    `cfg.log_every` sets how often stages report (use the steps per epoch).
    """
    data = bench_data(cfg)
    stages = len(build_local_modules(cfg, data.in_channels, data.num_classes, data.input_size))
    summary = launcher.run_spawned(cfg, stages, data_shape(data, cfg.batch_size))
    reports = summary["timeline"]  # (arrival time, stage, step, busy s, idle s) of every train report
    by_stage = [{r[2]: r for r in reports if r[1] == k} for k in range(stages)]
    common_steps = sorted(set.intersection(*(set(s) for s in by_stage)))
    first = next(s for s in common_steps if s >= warmup_steps)
    last = common_steps[-1]
    if last <= first:
        raise ValueError(f"the run ended at step {last}: too short for {warmup_steps} warm-up steps")
    samples = (last - first) * cfg.batch_size
    per_stage = []
    for k in range(stages):
        t0, _, _, busy0, idle0 = by_stage[k][first]
        t1, _, _, busy1, idle1 = by_stage[k][last]
        wall = t1 - t0
        per_stage.append({"busy_s": busy1 - busy0, "busy_fraction": (busy1 - busy0) / wall,
                          "idle_fraction": (idle1 - idle0) / wall, "samples_per_s": samples / (busy1 - busy0)})
    window = by_stage[-1][last][0] - by_stage[-1][first][0]
    achieved = samples / window
    slowest = min(s["samples_per_s"] for s in per_stage)
    return {"stages": stages, "threads_per_stage": launcher.stage_threads(cfg, stages), "window_steps": last - first,
            "window_s": window, "samples_per_s": achieved, "slowest_stage_samples_per_s": slowest,
            "efficiency": achieved / slowest, "per_stage": per_stage, "run_seconds": summary["seconds"],
            "peak_memory_bytes": summary["peak_memory_bytes"], "peak_memory_kind": summary["peak_memory_kind"]}


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats with 3 significant digits (whole numbers from 1000 up)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the arguments, set torch's thread count, and keep the exact command for the results."""
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.command = " ".join([".venv/bin/python", p.prog, *argv])
    torch.set_num_threads(args.threads)
    return args


def meta(args: argparse.Namespace) -> dict[str, Any]:
    """Where and how the numbers were measured: the command, size, threads, cores, torch and CUDA."""
    return {"command": args.command, "size": size_of(args), "threads": args.threads, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": platform.python_version()}


def write_results(out: str | Path, results: dict[str, Any]) -> Path:
    """Write results.json into the output folder (created if needed) and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def unit_spans(steps: list[StageStep]) -> list[str]:
    """Each module's units as 'first-last' indices of the network's units (a module is a Sequential of units)."""
    spans, start = [], 0
    for step in steps:
        end = start + len(step.module)
        spans.append(f"{start}-{end - 1}")
        start = end
    return spans
