"""SGR's cost per stage: each module's step time with SGR over without (layer-wise), K = 2 and 3, in one process.

Every module trains on its own input of one batch, repeatedly, with the project's StageStep;
the SGR stage pays for an input-gradient graph (create_graph) and a double backward, and the
stage before it for the δ it sends.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/sgr_overhead.py`

from pipeline.data import train_batches
from bench.common import (bench_config, bench_data, build_steps, markdown_table, meta, parse, parser, size_of,
                          stage_step_seconds, unit_spans, write_results)

SIZES = {  # model, batch, splits K, timed repetitions per stage
    "smoke": ("resnet8", 16, [2, 3], 2),
    "quick": ("resnet32", 128, [2, 3], 8),
    "full": ("resnet32", 128, [2, 3], 30),
}


def main(argv: list[str] | None = None) -> dict:
    """Measure per-stage step time with and without SGR for each split; print the table last."""
    args = parse(parser("sgr_overhead", "SGR's step-time overhead per stage, in one process"), argv)
    model, batch, splits, reps = SIZES[size_of(args)]
    rows = []
    for k in splits:
        seconds = {}
        for method in ("layerwise", "sgr"):
            cfg = bench_config(model=model, batch_size=batch, stages=k, method=method, threads=args.threads)
            data = bench_data(cfg)
            steps = build_steps(cfg, data)
            x, y = next(train_batches(data, 0, cfg.batch_size, cfg.seed, False))
            seconds[method] = stage_step_seconds(steps, x, y, reps)
        for i, (span, plain, sgr) in enumerate(zip(unit_spans(steps), seconds["layerwise"], seconds["sgr"])):
            rows.append({"K": k, "stage": i + 1, "units": span, "layerwise_ms": 1000 * plain, "sgr_ms": 1000 * sgr,
                         "ratio": sgr / plain})
        plain, sgr = sum(seconds["layerwise"]), sum(seconds["sgr"])
        rows.append({"K": k, "stage": "all", "units": f"0-{sum(len(s.module) for s in steps) - 1}",
                     "layerwise_ms": 1000 * plain, "sgr_ms": 1000 * sgr, "ratio": sgr / plain})
    results = {"meta": meta(args), "model": model, "batch_size": batch, "reps": reps, "rows": rows}
    write_results(args.out, results)
    print(f"{model}, batch {batch}, {args.threads} torch threads, median of {reps} steps per stage")
    print(markdown_table(["K", "stage", "units", "layer-wise ms", "SGR ms", "SGR / layer-wise"],
                         [[r["K"], r["stage"], r["units"], r["layerwise_ms"], r["sgr_ms"], r["ratio"]] for r in rows]))
    return results


if __name__ == "__main__":
    main()
