"""The pipeline's own overhead, apart from the cores: every stage sleeps a fixed delay instead of computing.

With `simulate_step_ms` each stage process sleeps d ms per training batch (workers/simulated.py)
and passes its input on, so K stages can overlap perfectly even on 2 cores. Run one after
another in one process (the reference's loop), the same stages take K × d per batch; the
ideal pipeline takes d. Both draw the same batches and evaluate after each epoch. The
efficiency (pipeline samples/s) / (K × sequential samples/s) is what messages, credits, data
loading in stage 1 and Python leave of the ideal. Messages carry the batch (128×3×32×32 float32, 1.5 MB)
and, with SGR, a δ of the same size.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/schedule_overhead.py`

from pipeline.data import steps_per_epoch
from bench.common import (at_least, bench_config, bench_data, markdown_table, meta, one_process, parse, parser, pyplot,
                          positive_ms, run_pipeline, size_of, write_results)

SIZES = {  # stages K, delays ms, seconds of steady state to time, warm-up epochs
    "smoke": ([2], [5.0], 0.2, 1),
    "quick": ([2, 3, 4, 8], [1.0, 5.0, 20.0, 100.0], 1.5, 2),
    "full": ([2, 3, 4, 8], [1.0, 5.0, 20.0, 100.0], 6.0, 2),
}
TARGET_MS, TARGET = 20.0, 0.95


def main(argv: list[str] | None = None) -> dict:
    """Measure simulated pipelines against the same stages in sequence; print the table last."""
    p = parser("schedule_overhead", "pipeline schedule overhead with sleeping stages", threads=1)
    p.add_argument("--depth", type=at_least(1), default=2, help="messages a stage may send ahead (config key depth)")
    p.add_argument("--stages", type=at_least(2), nargs="+", help="only these K (default: the size's)")
    p.add_argument("--delays", type=positive_ms, nargs="+", help="only these stage delays in ms (default: the size's)")
    args = parse(p, argv)
    splits, delays, window_s, warmup = SIZES[size_of(args)]
    splits, delays = args.stages or splits, args.delays or delays
    base = bench_config(threads=args.threads, depth=args.depth, out=str(Path(args.out) / "run"))
    spe = steps_per_epoch(bench_data(base), base.batch_size)
    rows = []
    for k in splits:
        for ms in delays:
            timed_steps = max(3 * spe, math.ceil(window_s * 1000 / ms))
            epochs = warmup + math.ceil(timed_steps / spe)
            cfg = bench_config(**{**base.to_dict(), "stages": k, "simulate_step_ms": ms, "epochs": epochs,
                                  "log_every": spe})
            pipe = run_pipeline(cfg, warmup * spe)
            seq = one_process(cfg, 1, math.ceil(0.5 * window_s * 1000 / (k * ms * spe)))
            rows.append({"K": k, "delay_ms": ms, "pipeline_samples_per_s": pipe["samples_per_s"],
                         "sequential_samples_per_s": seq, "speedup": pipe["samples_per_s"] / seq,
                         "efficiency": pipe["samples_per_s"] / (k * seq), "window_steps": pipe["window_steps"],
                         "per_stage": pipe["per_stage"]})
    at_target = [r["efficiency"] for r in rows if r["delay_ms"] == TARGET_MS]
    target = {"delay_ms": TARGET_MS, "min_efficiency": TARGET, "worst": min(at_target) if at_target else None,
              "met": bool(at_target) and min(at_target) >= TARGET}
    results = {"meta": meta(args), "batch_size": base.batch_size, "depth": args.depth, "rows": rows, "target": target}
    write_results(args.out, results)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in splits:
        mine = [r for r in rows if r["K"] == k]
        ax.plot([r["delay_ms"] for r in mine], [r["efficiency"] for r in mine], marker="o", label=f"K={k}")
    ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1, label=f"target {TARGET}")
    ax.set(xscale="log", xlabel="simulated stage step (ms)", ylabel="pipeline / (K × sequential)",
           title="Schedule overhead (sleeping stages)", ylim=(0, 1.05))
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(args.out) / "schedule_overhead.png", dpi=120)

    verdict = "not measured" if not at_target else f"{'met' if target['met'] else 'missed'}, worst {target['worst']}"
    print(f"batch {base.batch_size}, depth {args.depth}, {args.threads} torch thread(s) per stage; target at {TARGET_MS:g} ms: "
          f"efficiency >= {TARGET} ({verdict})")
    print(markdown_table(["K", "stage delay ms", "sequential samples/s", "pipeline samples/s", "speed-up",
                          "efficiency (÷ K)", "timed steps"],
                         [[r["K"], r["delay_ms"], r["sequential_samples_per_s"], r["pipeline_samples_per_s"],
                           r["speedup"], r["efficiency"], r["window_steps"]] for r in rows]))
    return results


if __name__ == "__main__":
    main()
