"""The one entry point: `python launch.py --config configs/default.yaml [overrides]`.

Flags override the YAML; `--set key=value` overrides any config key; `--resume RUN_DIR`
continues a run from its newest complete checkpoint. Every config, data, checkpoint or
device problem ends the run before training with one line that says what to fix.
`python launch.py plot|export|evaluate RUN_DIR` work on a finished or interrupted run, `trace RUN_DIR`
on a finished run with `trace: true`;
`python launch.py plan [flags]` measures the config's model and prints the memory-balanced split;
`python launch.py models` lists the models by name.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
TOOLS = ("plot", "export", "evaluate", "trace")  # `launch.py TOOL RUN_DIR`
PLAN_IGNORES = {"--epochs", "--lr", "--schedule", "--no-progress", "--fresh"}  # training flags a plan ignores

# flag -> config key, for the flags that are plain overrides
FLAG_KEYS = {
    "method": "method", "stages": "stages", "lam": "lam", "epochs": "epochs", "device": "device",
    "out": "out", "seed": "seed", "model": "model", "dataset": "dataset", "data_dir": "data_dir",
    "batch_size": "batch_size", "lr": "lr", "schedule": "schedule", "threads": "threads",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return training_parser().parse_args(argv)


def training_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """The flags of a training run (`plan` takes them too)."""
    p = argparse.ArgumentParser(description="Local learning with Successive Gradient Reconciliation (SGR).", **kwargs)
    p.add_argument("--config", help="YAML run config (default: configs/default.yaml; with --resume, the run's own)")
    p.add_argument("--method", help="sgr | layerwise | bp | reforward | greedy | fa | dfa | drtp")
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
    p.add_argument("--replicas", metavar="N|[N1,N2,...]",
                   help="pipeline: processes per stage, each on a shard of every batch (one count, one per stage, or auto)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set split=[6,11] --set sgr_reduction=sample")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to the run directory)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest complete checkpoint "
                   "('latest': the config's out directory); flags still override the run's config")
    p.add_argument("--fresh", action="store_true",
                   help="start over in a run directory that holds an earlier run (deletes its checkpoints, records, "
                        "plots, trace and export)")
    return p


def parse_tool_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch.py", description="Tools on a finished or interrupted run directory.")
    sub = p.add_subparsers(dest="tool", required=True)
    sub.add_parser("plot", help="write RUN_DIR/plots/*.png from its metrics").add_argument("run_dir")
    export = sub.add_parser("export", help="stitch the newest checkpoint into one state dict for plain PyTorch")
    export.add_argument("run_dir")
    export.add_argument("--to", help="output file (default: RUN_DIR/model.pt)")
    evaluate = sub.add_parser("evaluate", help="every head's test accuracy (Barlow Twins: k-NN) at the newest checkpoint")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--linear-probe", dest="linear_probe", action="store_true",
                          help="instead, train a linear classifier on the last module's frozen features "
                               "(records: RUN_DIR/linear_probe.jsonl, result: RUN_DIR/linear_probe.json)")
    evaluate.add_argument("--probe-epochs", dest="probe_epochs", type=int, default=20, help="linear probe epochs")
    evaluate.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    sub.add_parser("trace", help="where each stage's time went, from RUN_DIR/trace.json (trace: true)").add_argument("run_dir")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    """YAML (with --resume: the run's own config.yaml), then --set overrides, then the named flags; validated."""
    from pipeline.config import ConfigError, from_dict, load_yaml, parse_override, validate

    overrides = dict(parse_override(o) for o in args.overrides)
    overrides.update({key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None})
    if args.replicas is not None:  # a count or a YAML list, as --set replicas=... reads it
        overrides["replicas"] = parse_override(f"replicas={args.replicas}")[1]
    if args.no_progress:
        overrides["progress"] = False
    cfg = validate(from_dict(overrides, base=load_yaml(args.config or DEFAULT_CONFIG), source="command line"))
    if args.resume is None:
        return cfg
    if not args.resume.strip():
        raise ConfigError("--resume needs a run directory (or latest: the config's out directory)")
    if args.fresh:
        raise ConfigError("--resume continues a run and --fresh starts one over: give one of them")
    run_dir = Path(cfg.out if args.resume == "latest" else args.resume)
    out = overrides.get("out")  # --out or --set out=...
    if out is not None and Path(str(out)).resolve() != run_dir.resolve():
        raise ConfigError(f"--resume {args.resume} writes into that run's own directory: drop --out {out} "
                          "(to keep the run as it is, copy its directory and resume the copy)")
    if args.config is None:
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); check the path given to --resume")
        base = load_yaml(run_dir / "config.yaml")
    else:
        base = load_yaml(args.config)
    return validate(from_dict({**overrides, "out": str(run_dir)}, base=base, source="command line"))


def find_resume(args: argparse.Namespace, cfg, data, steps_per_run: int, rank: int):
    """The checkpoint to continue from (None for a fresh run), or a one-line error; torn ones are warned about.
    `rank`: this torchrun rank (0 when spawned), as rank 0 alone clears a run for --fresh and says what it resumes."""
    from pipeline.checkpoint import CheckpointError, warnings_printed
    from pipeline.config import ConfigError, changed_settings, load_yaml
    from pipeline.rundir import clear_outputs, resume_checkpoint
    from pipeline.stages import split_cuts

    run_dir = Path(cfg.out)
    if not args.resume:
        held = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
        if held and not args.fresh:
            raise CheckpointError(f"{run_dir} holds checkpoints of an earlier run: continue it with --resume "
                                  f"{run_dir}, start over with --fresh (deletes that run), or choose another --out")
        if args.fresh and rank == 0:  # the rank that holds the run directory's lock
            clear_outputs(run_dir)
        return None
    if cfg.method == "greedy":
        raise CheckpointError("greedy runs cannot be resumed (modules train one after another); start it again")
    with warnings_printed():
        checkpoint = resume_checkpoint(cfg, split_cuts(cfg, data.in_channels, data.num_classes, data.input_size))
    if checkpoint.step >= steps_per_run:
        raise CheckpointError(f"{run_dir} already finished at step {checkpoint.step}; raise --epochs to train further")
    if rank == 0:  # torchrun: once, not once per rank
        print(f"resuming {run_dir} from step {checkpoint.step}", flush=True)
        with contextlib.suppress(ConfigError):  # a recorded config this version cannot read: the fingerprint matched
            changed = changed_settings(load_yaml(run_dir / "config.yaml"), cfg)
            if changed:  # the run's config.yaml is about to record the new values in place of these
                print("with settings changed from the run's config.yaml: "
                      + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items()), flush=True)
    return checkpoint


def run_tool(argv: list[str]) -> int:
    """`launch.py plot|export|evaluate|trace RUN_DIR`."""
    args = parse_tool_args(argv)
    if args.tool == "evaluate" and args.linear_probe and args.probe_epochs < 1:  # before any data or checkpoint is read
        print(f"error: --probe-epochs must be >= 1, got {args.probe_epochs}", file=sys.stderr)
        return 2
    from pipeline.checkpoint import (CheckpointError, DiskFull, RunFileError, fingerprint, latest_checkpoint,
                                     warnings_printed)
    from pipeline.config import ConfigError, barlow_twins_losses, knn_bank_size, load_yaml, validate
    from pipeline.data import DataError, load_config_data
    from pipeline.export import ExportError, export_path
    from pipeline.stages import configure_torch, split_cuts

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").exists():
        print(f"error: {run_dir} is not a run directory (no config.yaml)", file=sys.stderr)
        return 2
    if args.tool == "plot":
        from pipeline.plots import plot_run

        if not (run_dir / "metrics.jsonl").is_file():
            print(f"error: {run_dir / 'metrics.jsonl'} does not exist: the run has logged nothing to plot yet",
                  file=sys.stderr)
            return 2
        try:
            paths = plot_run(run_dir)
        except ValueError as err:  # a damaged metrics.jsonl: read_jsonl's message names the line
            print(f"error: {err}", file=sys.stderr)
            return 2
        except OSError as err:
            print(f"error: cannot write {run_dir / 'plots'} ({err.strerror})", file=sys.stderr)
            return 1
        for path in paths:
            print(path)
        return 0
    if args.tool == "trace":
        return print_trace(run_dir)
    try:
        cfg = load_yaml(run_dir / "config.yaml")
        device_name = "cpu"
        if args.tool == "evaluate":  # a GPU named on the command line must exist: validate says so in one line
            device_name = validate(dataclasses.replace(cfg, device=args.device)).device
        path = export_path(run_dir, args.to) if args.tool == "export" else None
        data = load_config_data(cfg)
        # the checkpoint must be of the config the tool rebuilds the network from (config.yaml may have been edited)
        expected = fingerprint(cfg, split_cuts(cfg, data.in_channels, data.num_classes, data.input_size))
    except (ConfigError, DataError, CheckpointError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    from pipeline.checkpoint import save_atomic
    from pipeline.export import exported_model, restore_steps
    from pipeline.metrics import format_eval
    from pipeline.trainer import evaluate

    device = torch.device(device_name)
    configure_torch(cfg, device)  # the run's kernels: TF32 or not, deterministic or not
    for attempt in range(3):  # a live run may prune the checkpoint picked before it is read: then pick again
        checkpoint = None
        try:
            with warnings_printed():
                checkpoint = latest_checkpoint(run_dir, expected, fix=f"{run_dir / 'config.yaml'} is not the config "
                                                                      "it was trained with; put that one back")
            if args.tool == "export":
                exported = exported_model(cfg, data, checkpoint)
            else:
                _, steps = restore_steps(cfg, data, checkpoint, device)
        except CheckpointError as err:  # none good, or one that loads but is not this network's state
            print(f"error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # FileNotFoundError: pruned while it was verified or read (a folder half deleted)
            if not isinstance(err, FileNotFoundError) or attempt == 2:
                where = err.filename or (run_dir / "checkpoints" if checkpoint is None else checkpoint.path)
                print(f"error: checkpoint {where} cannot be read ({err.strerror or err})", file=sys.stderr)
                return 2
            continue
        break
    if args.tool == "export":
        try:
            save_atomic(exported, path, fix="free some space or choose another --to")
        except (OSError, RuntimeError) as err:  # a full disk is DiskFull's own line
            said = isinstance(err, (DiskFull, RunFileError))  # their line names the file
            print(f"error: {err if said else f'cannot write {path} ({err})'}", file=sys.stderr)
            return 1
        print(f"exported step {checkpoint.step} to {path}; load it with pipeline.export.load_exported({str(path)!r})")
        return 0
    try:
        if args.linear_probe:
            return run_linear_probe(cfg, data, checkpoint, steps, run_dir, args.probe_epochs, device)
        scores = evaluate(steps, data, cfg.eval_batch_size, device, knn_bank_size(cfg))
    except (DataError, DiskFull) as err:  # an image that will not decode; the probe's records on a full disk
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # only the probe writes: its records go into the run directory
        if not args.linear_probe:
            raise
        what = err if isinstance(err, RunFileError) else (  # a RunFileError's line names the file
            f"cannot write the linear probe's records in {run_dir} ({err.strerror or err})")
        print(f"error: {what}; the run directory must be writable for --linear-probe", file=sys.stderr)
        return 1
    print(format_eval(checkpoint.step, scores["test_acc"], knn=barlow_twins_losses(cfg)))
    return 0


def run_linear_probe(cfg, data, checkpoint, steps, run_dir: Path, epochs: int, device) -> int:
    """`launch.py evaluate RUN_DIR --linear-probe`: the probe's per-epoch records and result in the run directory."""
    from pipeline.linear_probe import probe_checkpoint

    accuracy = probe_checkpoint(cfg, data, checkpoint, steps, run_dir, epochs, device)
    print(f"[linear probe] step {checkpoint.step}: test accuracy {100 * accuracy:.2f}% (the last module's frozen "
          f"features, {epochs} epochs); records in {run_dir / 'linear_probe.jsonl'}")
    return 0


def print_models() -> int:
    """`launch.py models`: every model name the config's `model` accepts."""
    from pipeline.registry import REGISTRY, model_names

    print("| model | what it is |")
    print("|---|---|")
    for name, entry in zip(model_names(), REGISTRY.values()):
        print(f"| {name} | {entry.about} |")
    return 0


def print_trace(run_dir: Path) -> int:
    """`launch.py trace RUN_DIR`: per stage, busy / waiting for input / waiting for credit / other, in % of wall time."""
    import json

    from workers.trace import is_complete, summarize

    path = run_dir / "trace.json"
    try:
        trace = json.loads(path.read_text())
        rows = summarize(trace)
        complete = is_complete(trace)
    except FileNotFoundError:
        from pipeline.config import ConfigError, load_yaml

        try:
            cfg = load_yaml(run_dir / "config.yaml")
            traced = cfg.trace and cfg.schedule == "pipeline"  # the sequential trainer records no trace
        except ConfigError:
            traced = False
        how = ("a traced run writes it when it ends, also when it fails: this one is still running, failed before "
               "its stages reported, had its launcher killed, or its trace was removed" if traced
               else "run the pipeline with --set trace=true to record one")
        print(f"error: {path} does not exist; {how}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot read {path} ({err.strerror})", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError) as err:
        print(f"error: {path} is not a trace this tool wrote ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {path} holds no spans", file=sys.stderr)
        return 2
    print(f"{path}: {rows[0]['wall_s']:.2f} s traced; % of that wall time (open the file in https://ui.perfetto.dev)")
    if not complete:
        print("the run did not finish: these are the spans that reached the launcher (each stage's up to its last "
              "train report, a failed stage's up to its error)")
    print("| stage | busy | of which training | waiting for input | waiting for credit | other |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['busy']:.1f} | {r['train']:.1f} | {r['input']:.1f} | {r['credit']:.1f} | {r['other']:.1f} |")
    return 0


def run_plan(argv: list[str]) -> int:
    """`launch.py plan [--gpus G [--memory-cap GiB]] [training flags]`: measure every candidate module, print the
    least-memory split for K; with --gpus, also the fastest cuts and replica counts on G devices."""
    from pipeline.config import ConfigError
    from pipeline.data import DataError, load_config_data
    from pipeline.plan import plan_split

    p = argparse.ArgumentParser(prog="launch.py plan", parents=[training_parser(add_help=False)],
                                description="Measure each candidate module's memory and time and print the "
                                            "least-memory split for --stages K; with --gpus, the fastest cuts and "
                                            "replica counts on that many devices. Takes the training flags.")
    p.add_argument("--gpus", type=int, help="plan cuts and replica counts for this many devices")
    p.add_argument("--memory-cap", dest="memory_cap", type=float,
                   help="GiB per device (default: the GPU's memory; on the CPU, global BP's footprint)")
    for action in p._actions:  # still taken (a training command line plans as it is), but not listed: no effect here
        if set(action.option_strings) & PLAN_IGNORES:
            action.help = argparse.SUPPRESS
    args = layout_args = p.parse_args(argv)
    try:
        cfg = build_config(args)
        if cfg.method == "bp":
            raise ConfigError("method bp trains the whole network as one module: there is no split to plan")
        if cfg.stages is None:
            raise ConfigError("plan needs the number of modules: give --stages K")
        if layout_args.gpus is not None and cfg.local_loss == "barlow_twins":
            raise ConfigError("local_loss barlow_twins trains one process per stage (replicas: 1), so --gpus would "
                              "plan replicas it cannot use; plan without --gpus")
        if layout_args.gpus is not None and layout_args.gpus < cfg.stages:
            raise ConfigError(f"--gpus {layout_args.gpus} is fewer than the {cfg.stages} stages; give at least {cfg.stages}")
        cap = layout_args.memory_cap
        if cap is not None and layout_args.gpus is None:
            raise ConfigError("--memory-cap caps the devices of --gpus G: give --gpus too")
        if cap is not None and not (math.isfinite(cap) and cap > 0):  # before the profiling pass, not after it
            raise ConfigError(f"--memory-cap must be a positive number of GiB, got {cap}")
        data = load_config_data(cfg)
        # for replicas: BatchNorm measured as SyncBatchNorm (it keeps more for backward), if the run will use it
        sync_bn = layout_args.gpus is not None and cfg.sync_bn
        plan = plan_split(cfg, data.in_channels, data.num_classes, data.input_size, sync_bn)
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mb, bp = 1 << 20, plan.global_bp.total
    total_s = sum(plan.seconds)
    print(f"plan: {cfg.model}, {cfg.method} (λ={cfg.lam}), K={cfg.stages}, batch {plan.batch_size}, {cfg.device}; "
          f"measured at batches {plan.profile_batch} and {plan.profile_batch + 1}, extrapolated; MB = 2^20 bytes"
          + ("; BatchNorm as SyncBatchNorm (sync_bn)" if sync_bn else ""))
    print(f"{'stage':>5} {'units':>8} {'saved MB':>10} {'weights MB':>11} {'total MB':>10} {'of BP':>7} {'compute':>8}")
    for k, (units, memory, seconds) in enumerate(zip(plan.units, plan.memory, plan.seconds)):
        weights = memory.params + memory.grads + memory.optimizer
        print(f"{k + 1:>5} {f'{units.start}-{units.stop - 1}':>8} {memory.saved / mb:>10.1f} {weights / mb:>11.1f} "
              f"{memory.total / mb:>10.1f} {memory.total / bp:>7.1%} {seconds / total_s:>8.1%}")
    print(f"global BP {bp / mb:.1f} MB; largest stage {plan.largest / mb:.1f} MB: saving {1 - plan.largest / bp:.1%}")
    cuts = ",".join(map(str, plan.cuts))
    print(f"cuts [{cuts}]: train with split: auto, or with these cuts: --set split=[{cuts}]")
    if layout_args.gpus is not None:
        return print_layout(cfg, plan, layout_args.gpus, layout_args.memory_cap)
    return 0


def print_layout(cfg, plan, gpus: int, memory_cap_gib: float | None) -> int:
    """The planner's cuts and replica counts on `gpus` devices, against one device per stage and plain data parallelism."""
    import torch

    from pipeline.plan import allreduce_seconds
    from pipeline.splits import module_ranges

    mib = 1 << 20
    if memory_cap_gib is not None:
        cap, where = memory_cap_gib * 1024 * mib, "given"
    elif cfg.device.startswith("cuda"):
        cap, where = torch.cuda.get_device_properties(torch.device(cfg.device)).total_memory, "the GPU's memory"
    else:
        cap, where = plan.global_bp.total, "global BP's footprint, as on the CPU there is no device memory"
    bandwidth = cfg.allreduce_gbps * 1e9  # bytes/s of the replicas' gradient all-reduce (0: left out)
    layout = plan.layout(cfg.stages, gpus, cap, bus_bytes_per_second=bandwidth)
    single = plan.layout(cfg.stages, cfg.stages, cap)
    if layout is None:
        print(f"error: no layout of {cfg.stages} stages fits {cap / mib:.0f} MiB per device on {gpus} devices; "
              "raise --memory-cap or lower the batch", file=sys.stderr)
        return 2
    batch, n = plan.batch_size, plan.n_units
    ranges = module_ranges(layout.cuts, n)
    memory = [plan.memory_at(r.start, r.stop, batch / c).total for r, c in zip(ranges, layout.counts)]
    sync_note = (f"then its gradient all-reduce at {cfg.allreduce_gbps:g} GB/s (allreduce_gbps)" if bandwidth else
                 "the all-reduce is left out: measure its bandwidth with bench/allreduce.py, give --set allreduce_gbps=")
    print(f"\nlayout on {gpus} devices, at most {cap / mib:.0f} MiB each ({where}); step times from the profiling "
          f"pass, scaled to batch {batch}; a replica takes 1/count of its stage's step, {sync_note}")
    print("| stage | units | replicas | memory per device MiB | ms per batch per replica | all-reduce ms | predicted busy |")
    print("|---|---|---|---|---|---|---|")
    for k, (units, count, seconds, sync, busy) in enumerate(zip(ranges, layout.counts, layout.seconds, layout.sync,
                                                                 layout.busy)):
        print(f"| {k + 1} | {units.start}-{units.stop - 1} | {count} | {memory[k] / mib:.1f} | "
              f"{1000 * seconds / count:.1f} | {1000 * sync:.1f} | {busy:.2f} |")
    local = [plan.memory_at(r.start, r.stop, batch / gpus) for r in ranges]
    local_memory = sum(m.params + m.grads + m.optimizer for m in local) + max(m.saved for m in local)
    # each device trains every module on batch / G rows, one after another, then all-reduces every gradient
    local_grads = sum(plan.table[(r.start, r.stop)].grads for r in ranges)
    local_rate = 1 / (sum(layout.seconds) / gpus + allreduce_seconds(local_grads, gpus, bandwidth))
    bp_rate = 1 / (plan.step_seconds[(0, n)] / gpus + allreduce_seconds(plan.global_bp.grads, gpus, bandwidth))
    rows = [("this layout", sum(layout.counts), layout.rate, max(memory)),
            *([] if single is None else [(f"one device per stage, cuts {single.cuts}", cfg.stages, single.rate,
                                          max(plan.memory_at(r.start, r.stop, batch).total
                                              for r in module_ranges(single.cuts, n)))]),
            ("local learning, plain data parallel (sequential trainer)", gpus, local_rate, local_memory),
            ("global BP, plain data parallel", gpus, bp_rate, plan.memory_at(0, n, batch / gpus).total)]
    print("\n| on these devices | devices | predicted samples/s | this layout's speed-up over it | memory per device MiB |")
    print("|---|---|---|---|---|")
    for name, devices, rate, per_device in rows:
        over = " (over the cap)" if per_device > cap else ""
        print(f"| {name} | {devices} | {rate * batch:.3g} | {layout.rate / rate:.2f} | {per_device / mib:.1f}{over} |")
    if single is None:
        print(f"| one device per stage | {cfg.stages} | does not fit | | |")
    replicas = ",".join(map(str, layout.counts))
    cuts = ",".join(map(str, layout.cuts))
    print(f"\ntrain it: --set split=[{cuts}] --replicas [{replicas}] "
          f"(torchrun: --nproc-per-node {sum(layout.counts)})")
    return 0


def plan_auto_split(cfg, data, world):
    """Resolve `split: auto` into cut points (and its plan) before any stage starts.

    The profiling pass runs in a child process, so no CUDA context or cached memory stays with
    the launcher; under torchrun each rank plans on its own GPU (the plan counts bytes, so every
    rank gets the same cuts).
    """
    import multiprocessing as mp

    from pipeline.plan import resolve_auto_split

    if cfg.split != "auto" or cfg.method == "bp":
        return cfg, None
    device = cfg.device
    if world.size > 1:  # this rank's own stage device
        device = rank_device(cfg, world)
    with mp.get_context("spawn").Pool(1) as pool:
        _, plan = pool.apply(resolve_auto_split, (dataclasses.replace(cfg, device=device), data.in_channels,
                                                  data.num_classes, data.input_size))
    return dataclasses.replace(cfg, split=plan.cuts), plan


def rank_device(cfg, world) -> str:
    """The device of the stage this torchrun rank runs (workers.placement.stage_device with its local rank)."""
    from workers.launcher import visible_gpus
    from workers.placement import stage_device

    return stage_device(cfg.device, cfg.gpus, world.rank, visible_gpus(cfg), world.local_rank)


def check_topology(cfg, stages: int, world) -> None:
    """Refuse pipeline set-ups that cannot run, before any process starts (`world`: torchrun's processes)."""
    world_size = world.size
    from pipeline.bpfree import NEEDS_OUTPUT_ERROR
    from pipeline.config import ConfigError
    from workers.routes import check_batch, replica_counts

    if cfg.schedule == "pipeline" and cfg.method == "greedy":
        raise ConfigError("method greedy trains modules one after another; run it with --schedule sequential")
    if cfg.schedule == "pipeline" and cfg.method in NEEDS_OUTPUT_ERROR:
        raise ConfigError(f"method {cfg.method} updates every layer from the output error of the same batch, "
                          "which a pipeline stage does not have yet; run it with --schedule sequential")
    if cfg.replicas == "auto":  # planned under torchrun by rank 0, for the processes torchrun started
        if cfg.schedule != "pipeline" or world_size < stages:
            raise ConfigError(f"replicas auto plans the pipeline's processes: it needs --schedule pipeline and, under "
                              f"torchrun, at least one process per stage ({stages})")
        return
    counts = replica_counts(cfg.replicas, stages)
    processes = sum(counts)
    if cfg.schedule != "pipeline" and processes > stages:
        raise ConfigError("replicas are processes of the pipeline; --schedule sequential trains in one process: "
                          "drop --replicas or use --schedule pipeline")
    if cfg.schedule == "pipeline":
        check_batch(cfg.batch_size, counts)
    if world_size > 1 and world_size != processes:
        layout = f"{stages} stages" if processes == stages else f"{stages} stages with replicas {counts} ({processes} processes)"
        raise ConfigError(
            f"torchrun started {world_size} processes but the run has {layout}; use --nproc-per-node "
            f"{processes} (one process per stage replica) or 1 (the launcher spawns them)")
    if cfg.schedule == "pipeline" and cfg.device.startswith("cuda") and cfg.gpus and len(cfg.gpus) != processes:
        raise ConfigError(f"gpus lists {len(cfg.gpus)} devices but the run has {processes} stage processes; "
                          "give one GPU per process (stage by stage, replicas in order)")
    if world_size > 1 and cfg.schedule != "pipeline":
        raise ConfigError("--schedule sequential runs in one process; start it with python, not torchrun")
    if cfg.schedule == "pipeline" and cfg.device.startswith("cuda"):  # every stage's GPU exists (one-line error if not)
        if world_size > 1:
            rank_device(cfg, world)
        else:
            from workers.launcher import spawned_devices

            spawned_devices(cfg, processes)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the launcher is, so the same cleanup as Ctrl-C's runs."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


def stopped_by(err: KeyboardInterrupt) -> tuple[str, int]:
    """What a run stopped by a signal says, and its exit code (128 + the signal's number, as a shell reports it)."""
    signum = err.signum if isinstance(err, Terminated) else signal.SIGINT
    return {signal.SIGINT: "interrupted", signal.SIGHUP: "hung up"}.get(signum, "terminated"), 128 + signum


def _raise(error: KeyboardInterrupt) -> None:
    """Raise a Ctrl-C, SIGTERM or SIGHUP where the launcher is, unless it is inside an interrupts_deferred block
    (then at its end). Until pipeline.lifeline is imported (it brings torch) no such block can have started."""
    lifeline = sys.modules.get("pipeline.lifeline")
    if lifeline is None:
        raise error
    lifeline.raise_interrupt(error)


def _terminate(signum: int, frame: object) -> None:
    _raise(Terminated(signum))


def _interrupt(signum: int, frame: object) -> None:
    _raise(KeyboardInterrupt())


def stop_on_signals() -> None:
    """From now on Ctrl-C raises KeyboardInterrupt and SIGTERM or SIGHUP Terminated where this process is (deferred
    out of interrupts_deferred blocks), also where SIGINT was inherited ignored, but SIGHUP stays ignored under
    nohup; in the main thread only (signals go there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _terminate)  # `kill`, a scheduler's preemption: stop the stages as Ctrl-C does
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # the terminal closed: stop them too
            signal.signal(signal.SIGHUP, _terminate)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stop_on_signals()
    try:
        if argv and argv[0] in TOOLS:
            return run_tool(argv)
        if argv and argv[0] == "plan":
            return run_plan(argv[1:])
        if argv and argv[0] == "models":
            if len(argv) > 1:  # it takes no arguments: --help gets the usage, anything else an error
                asked = argv[1:] in (["-h"], ["--help"])
                print("usage: launch.py models  (lists every model name --model accepts)",
                      file=sys.stdout if asked else sys.stderr)
                return 0 if asked else 2
            return print_models()
        args = parse_args(argv)
        with contextlib.ExitStack() as held:  # the run directory's lock, released however the run ends
            return run_job(args, held)
    except KeyboardInterrupt as err:  # before any stage started (run_job stops running ones itself), or in a tool
        said, code = stopped_by(err)
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            print(said, file=sys.stderr, flush=True)
        return code


def run_job(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    """Train the job `args` describe (sequential, spawned or torchrun); the exit code. `held` keeps the run's lock."""
    from pipeline.checkpoint import CheckpointError, DiskFull, RunFileError, complete_checkpoints_quiet
    from pipeline.config import ConfigError
    from pipeline.data import DataError, data_shape, load_config_data, steps_per_epoch
    from pipeline.lifeline import forkserver, remove_multiprocessing_temp_dir, temp_dir_error
    from pipeline.rundir import lock_run_dir
    from pipeline.stages import build_local_modules
    from pipeline.trainer import SequentialTrainer
    from workers.coordinator import StageFailed
    from workers.launcher import auto_replicas, run_spawned, run_torchrun, visible_gpus
    from workers.placement import torchrun_world

    try:
        world = torchrun_world(os.environ)  # before anything waits on the other ranks: a bad variable is one line
        world_size = world.size
        cfg = build_config(args)
        if (problem := temp_dir_error()) is not None:  # before the first forkserver or socket
            raise ConfigError(problem)
        if cfg.schedule == "pipeline" and world_size == 1:
            forkserver()  # the stages' server starts importing now, while this process loads the data
        data = load_config_data(cfg)
        steps = steps_per_epoch(data, cfg.batch_size)
        if steps < 1:
            raise ConfigError(f"the training set has {len(data.train_y)} samples, fewer than batch_size={cfg.batch_size}")
        cfg, plan = plan_auto_split(cfg, data, world)
        if plan is not None and world.rank == 0:
            print(f"split auto: cuts {plan.cuts}, largest stage {plan.largest / 2**20:.1f} MB of global BP's "
                  f"{plan.global_bp.total / 2**20:.1f} MB (see `launch.py plan`)", flush=True)
        stages = len(build_local_modules(cfg, data.in_channels, data.num_classes, data.input_size))
        if cfg.replicas == "auto" and cfg.schedule == "pipeline" and world_size == 1:
            gpus = visible_gpus(cfg) if cfg.device == "cuda" else 0  # cuda:N puts every process on one GPU
            cfg = dataclasses.replace(cfg, replicas=auto_replicas(cfg, data_shape(data, cfg.batch_size), stages, gpus,
                                                                  "cuda:0" if gpus else cfg.device))
            print(f"replicas auto: {cfg.replicas} " + (f"(planned for {gpus} GPUs)" if gpus > stages else
                                                       "(one per stage: no more GPUs than stages to spread over)"),
                  flush=True)
        check_topology(cfg, stages, world)
        if world.rank == 0:  # a second launcher on this directory is refused while we run
            held.enter_context(lock_run_dir(Path(cfg.out)))
        resume = find_resume(args, cfg, data, steps * cfg.epochs, world.rank)  # every torchrun rank finds the same one
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    is_reporter = world.rank == 0
    if is_reporter:
        print(f"{cfg.method} | {cfg.model} | K={stages} | λ={cfg.lam} | {cfg.schedule} | {cfg.dataset} "
              f"({len(data.train_y)} train / {len(data.test_y)} test) | {cfg.epochs} epochs | run dir {cfg.out}",
              flush=True)
    try:
        if cfg.schedule == "sequential":
            result = SequentialTrainer(cfg, data, resume=resume).run()
        elif world_size > 1:
            result = run_torchrun(cfg, stages, data, resume)  # stage 1's ranks draw from it: not loaded twice
        else:
            shape = data_shape(data, cfg.batch_size)
            del data  # stage 1 loads its own copy; the other stages need only its shape
            result = run_spawned(cfg, stages, shape, resume)
    except (CheckpointError, ConfigError) as err:  # a torchrun layout planned by rank 0 may not fit the world
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except (StageFailed, FloatingPointError, DiskFull, DataError) as err:  # DataError: an image that will not decode
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except RunFileError as err:  # a file of the run directory that cannot be written (write_text_atomic names it)
        print(f"error: {err.strerror}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as err:
        said, code = stopped_by(err)
        resume = ""
        if world.rank == 0:  # the rank whose coordinator sealed the checkpoints (other nodes may not see them)
            with contextlib.suppress(OSError, KeyboardInterrupt):  # a second Ctrl-C here only drops the suffix
                kept = complete_checkpoints_quiet(Path(cfg.out))
                resume = (f"; checkpoint of step {kept[-1].step} kept: resume with --resume {cfg.out}" if kept
                          else "; no checkpoint yet")
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP): its line is lost, not the cleanup
            print(f"{said}: all stages stopped{resume}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):  # stdout may be a file that is still there
            sys.stdout.flush()
        remove_multiprocessing_temp_dir()  # os._exit skips multiprocessing's own cleanup
        os._exit(code)  # the stages are stopped; no interrupted helper thread may hold up exit
    if result is not None:
        print(f"final test accuracy (last head): {100 * result['final_test_acc']:.2f}% in {result['seconds']:.0f} s; "
              f"records in {cfg.out}/metrics.jsonl", flush=True)
        from pipeline.plots import plot_run

        try:
            plot_run(Path(cfg.out))
        except OSError as err:  # the run itself is saved: only its pictures are missing
            print(f"warning: plots not written ({err.strerror or err}); make them with `launch.py plot {cfg.out}`",
                  file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":  # a torchrun rank (or a malformed WORLD_SIZE, refused: harmless)
        # a torchrun rank whose job is over: torchrun's SIGTERM (it stops every rank when one ends) would cut the
        # exit's cleanup short, and Python ends threads still inside torch calls by aborting the process (SIGABRT)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)
