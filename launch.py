"""The one entry point: `python launch.py --config configs/default.yaml [overrides]`.

Flags override the YAML; `--set key=value` overrides any config key. Every config, data
or device problem ends the run before training with one line that says what to fix.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"

# flag -> config key, for the flags that are plain overrides
FLAG_KEYS = {
    "method": "method", "stages": "stages", "lam": "lam", "epochs": "epochs", "device": "device",
    "out": "out", "seed": "seed", "model": "model", "dataset": "dataset", "data_dir": "data_dir",
    "batch_size": "batch_size", "lr": "lr", "schedule": "schedule", "threads": "threads",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Local learning with Successive Gradient Reconciliation (SGR).")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config (default: configs/default.yaml)")
    p.add_argument("--method", help="sgr | layerwise | bp | reforward | greedy")
    p.add_argument("--stages", type=int, help="number of local modules K")
    p.add_argument("--lam", type=float, help="λ of the SGR term")
    p.add_argument("--epochs", type=int)
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--out", help="run directory")
    p.add_argument("--seed", type=int)
    p.add_argument("--model", help="e.g. resnet32, plainnet32, vgg17")
    p.add_argument("--dataset", help="fashion_mnist | digits | cifar10 | cifar100 | imagefolder | synthetic")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", help="pipeline (default: one process per module) | sequential (single-process reference)")
    p.add_argument("--threads", type=int, help="torch threads (0: PyTorch's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set split=[6,11] --set sgr_reduction=sample")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to the run directory)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    """YAML, then --set overrides, then the named flags; validated."""
    from pipeline.config import from_dict, load_yaml, parse_override, validate

    cfg = load_yaml(args.config)
    overrides = dict(parse_override(o) for o in args.overrides)
    overrides.update({key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None})
    if args.no_progress:
        overrides["progress"] = False
    return validate(from_dict(overrides, base=cfg, source="command line"))


def check_topology(cfg, stages: int, world_size: int) -> None:
    """Refuse pipeline set-ups that cannot run, before any process starts."""
    from pipeline.config import ConfigError

    if cfg.schedule == "pipeline" and cfg.method == "greedy":
        raise ConfigError("method greedy trains modules one after another; run it with --schedule sequential")
    if world_size > 1 and world_size != stages:
        raise ConfigError(
            f"torchrun started {world_size} processes but the split has {stages} stages; use --nproc-per-node "
            f"{stages} (one process per stage) or 1 (the launcher spawns the stages)")
    if cfg.schedule == "pipeline" and cfg.device.startswith("cuda") and cfg.gpus and len(cfg.gpus) != stages:
        raise ConfigError(f"gpus lists {len(cfg.gpus)} devices but the split has {stages} stages; give one GPU per stage")
    if world_size > 1 and cfg.schedule != "pipeline":
        raise ConfigError("--schedule sequential runs in one process; start it with python, not torchrun")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.config import ConfigError
    from pipeline.data import DataError, load_data, steps_per_epoch
    from pipeline.stages import build_local_modules
    from pipeline.trainer import SequentialTrainer
    from workers.coordinator import StageFailed
    from workers.launcher import run_spawned, run_torchrun

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = build_config(args)
        data = load_data(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.train_subset)
        steps = steps_per_epoch(data, cfg.batch_size)
        if steps < 1:
            raise ConfigError(f"the training set has {len(data.train_y)} samples, fewer than batch_size={cfg.batch_size}")
        stages = len(build_local_modules(cfg, data.in_channels, data.num_classes, data.input_size))
        check_topology(cfg, stages, world_size)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    is_reporter = int(os.environ.get("RANK", "0")) == 0
    if is_reporter:
        print(f"{cfg.method} | {cfg.model} | K={stages} | λ={cfg.lam} | {cfg.schedule} | {cfg.dataset} "
              f"({len(data.train_y)} train / {len(data.test_y)} test) | {cfg.epochs} epochs | run dir {cfg.out}",
              flush=True)
    try:
        if cfg.schedule == "sequential":
            result = SequentialTrainer(cfg, data).run()
        elif world_size > 1:
            result = run_torchrun(cfg, stages, steps)
        else:
            del data  # each stage process loads its own copy
            result = run_spawned(cfg, stages, steps)
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted: all stages stopped", file=sys.stderr, flush=True)
        return 130
    if result is not None:
        print(f"final test accuracy (last head): {100 * result['final_test_acc']:.2f}% in {result['seconds']:.0f} s; "
              f"records in {cfg.out}/metrics.jsonl", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
