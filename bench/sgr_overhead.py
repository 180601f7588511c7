"""SGR's cost per stage: each module's step time with SGR over without (layer-wise), in one process, beside global BP.

Every module trains on its own input of one batch, repeatedly, with the project's StageStep;
the SGR stage pays for an input-gradient graph (create_graph) and a double backward, and the
stage before it for the δ it sends. Default: ResNet-32 on CIFAR-sized images, K = 2 and 3.
`--imagenet`: Table 5's ResNet-50 and ViT-S K = 3 configs as bench/imagenet_gpu.py runs them on
one GPU (batch 64; with --smoke their tiny CPU versions), which says whether a pipeline's rate on
one GPU is set by SGR's own cost or by the pipeline.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/sgr_overhead.py`

import torch

from pipeline.config import Config
from pipeline.data import train_batches
from bench.common import (bench_config, bench_data, build_steps, markdown_table, meta, parse, parser, size_of,
                          stage_step_seconds, unit_spans, write_results)
from bench.imagenet_gpu import CONFIGS, planned_config

SIZES = {  # model, batch, splits K, timed repetitions per stage
    "smoke": ("resnet8", 16, [2, 3], 2),
    "quick": ("resnet32", 128, [2, 3], 8),
    "full": ("resnet32", 128, [2, 3], 30),
}


def measure(cfg: Config, reps: int) -> list[dict]:
    """One row per module (layer-wise and SGR ms) and an `all` row with global BP's step, for one config."""
    data = bench_data(cfg)
    device = torch.device(cfg.device)
    x, y = next(train_batches(data, 0, cfg.batch_size, cfg.seed, False, device=device))
    y = y.to(device)
    seconds = {}
    for method in ("bp", "layerwise", "sgr"):  # bp: one module, whatever the split
        steps = build_steps(dataclasses.replace(cfg, method=method), data, cfg.device)
        seconds[method] = stage_step_seconds(steps, x, y, reps)
        if method == "sgr":
            spans, units = unit_spans(steps), sum(len(step.module) for step in steps)
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = [{"model": cfg.model, "K": cfg.stages, "stage": i + 1, "units": span, "layerwise_ms": 1000 * plain,
             "sgr_ms": 1000 * sgr, "ratio": sgr / plain, "bp_ms": None}
            for i, (span, plain, sgr) in enumerate(zip(spans, seconds["layerwise"], seconds["sgr"]))]
    plain, sgr = sum(seconds["layerwise"]), sum(seconds["sgr"])
    rows.append({"model": cfg.model, "K": cfg.stages, "stage": "all", "units": f"0-{units - 1}",
                 "layerwise_ms": 1000 * plain, "sgr_ms": 1000 * sgr, "ratio": sgr / plain,
                 "bp_ms": 1000 * seconds["bp"][0]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Measure per-stage step time with and without SGR, and global BP's, for each config; print the table last."""
    p = parser("sgr_overhead", "SGR's step-time overhead per stage, in one process")
    p.add_argument("--imagenet", action="store_true",
                   help="Table 5's ResNet-50 and ViT-S K=3 configs on one GPU at batch 64 (--smoke: tiny, on the CPU)")
    args = parse(p, argv)
    size = size_of(args)
    model, batch, splits, reps = SIZES[size]
    if args.imagenet:
        if size != "smoke" and not torch.cuda.is_available():
            sys.exit("bench/sgr_overhead.py --imagenet needs a CUDA GPU (add --smoke to run its code on the CPU)")
        configs = [planned_config(name, "smoke" if size == "smoke" else "check", args.threads)[0] for name in CONFIGS]
    else:
        configs = [bench_config(model=model, batch_size=batch, stages=k, threads=args.threads) for k in splits]
    rows = [row for cfg in configs for row in measure(cfg, reps)]
    results = {"meta": meta(args), "batch_size": configs[0].batch_size, "reps": reps, "rows": rows}
    write_results(args.out, results)
    print(f"batch {configs[0].batch_size}, {args.threads} torch threads, median of {reps} steps per stage "
          f"({configs[0].device}; the `all` rows: every module in turn, and global BP's step)")
    print(markdown_table(["model", "K", "stage", "units", "layer-wise ms", "SGR ms", "SGR / layer-wise",
                          "global BP ms"],
                         [[r["model"], r["K"], r["stage"], r["units"], r["layerwise_ms"], r["sgr_ms"], r["ratio"],
                           "-" if r["bp_ms"] is None else r["bp_ms"]] for r in rows]))
    return results


if __name__ == "__main__":
    main()
