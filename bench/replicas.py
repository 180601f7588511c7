"""Replicated stages with sleeping stages: does adding replicas to the slow stages buy what it should?

Every stage process sleeps instead of computing (workers/simulated.py), d_k ms per batch for
stage k, d_k / c_k for each of c_k replicas (a replica trains on 1/c_k of every batch: ideal
data parallelism), and still averages its gradients with its replicas through gloo. So the
cores are not what is measured: the schedule is, with its messages, row routing and collectives.
Stage times 10 / 30 / 30 ms: with one process per stage the 30 ms stages set the pace; with
[1, 3, 3] every stage takes 10 ms, the ideal speed-up is 3×. A last row runs the planner's own
choice for --gpus processes (pipeline/plan.best_layout on the same stage times). The same layouts
run again with every stage time ×10: what the schedule loses per step (messages, the replicas'
all-reduce) then weighs a tenth as much. Runs are traced: the table shows how much longer than its
sleep stage 2's step took (median; for replicas, mostly the gradient all-reduce).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/replicas.py`

from pipeline.data import steps_per_epoch
from pipeline.plan import best_layout
from bench.common import (at_least, bench_config, bench_data, markdown_table, meta, parse, parser, run_pipeline,
                          size_of, write_results)

STAGE_MS = [10.0, 30.0, 30.0]
LAYOUTS = [[1, 1, 1], [1, 3, 3]]
SIZES = {"smoke": ([(1, 12)], 1), "quick": ([(1, 150), (10, 30)], 2), "full": ([(1, 600), (10, 120)], 2)}  # (time scale, timed steps), warm-up epochs
TARGET = 0.9  # of the ideal speed-up


def main(argv: list[str] | None = None) -> dict:
    """Time each layout's steady state; print the table last."""
    p = parser("replicas", "replicated stages with sleeping stages", threads=1)
    p.add_argument("--gpus", type=at_least(len(STAGE_MS)), default=5,
                   help="processes the planner's row may use, one per stage at least (default: %(default)s)")
    args = parse(p, argv)
    scales, warmup = SIZES[size_of(args)]
    # 96 rows split evenly over 1, 2 and 3 replicas; 32×32 synthetic images, so a message is 1.2 MB (and its δ)
    base = bench_config(threads=args.threads, batch_size=96, stages=3, simulate_step_ms=STAGE_MS, model="resnet8",
                        out=str(Path(args.out) / "run"))
    spe = steps_per_epoch(bench_data(base), base.batch_size)
    seconds = {(k, k + 1): ms / 1000 for k, ms in enumerate(STAGE_MS)}
    planned = best_layout(seconds, lambda a, b, c: True, 3, 3, args.gpus, base.batch_size, cuts=[1, 2])
    rows = []
    for scale, timed in scales:
        stage_ms = [scale * ms for ms in STAGE_MS]
        mine = []
        for counts, label in [*((c, "given") for c in LAYOUTS), (planned.counts, f"planner, {args.gpus} processes")]:
            epochs = warmup + math.ceil(timed / spe)
            cfg = bench_config(**{**base.to_dict(), "replicas": counts, "epochs": epochs, "log_every": spe,
                                  "simulate_step_ms": stage_ms, "trace": True})
            pipe = run_pipeline(cfg, warmup * spe)
            trace = json.loads((Path(cfg.out) / "trace.json").read_text())["traceEvents"]
            steps = [e["dur"] / 1000 for e in trace if e["ph"] == "X" and e["tid"] == 1 and e["name"] == "train"]
            pace = max(ms / c for ms, c in zip(stage_ms, counts))  # the slowest stage's ms per batch
            mine.append({"stage_ms": stage_ms, "counts": counts, "layout": label, "processes": sum(counts),
                         "samples_per_s": pipe["samples_per_s"], "ideal_samples_per_s": base.batch_size * 1000 / pace,
                         "window_steps": pipe["window_steps"],
                         "stage2_extra_ms": statistics.median(steps) - stage_ms[1] / counts[1]})
        for r in mine:  # against one process per stage at the same stage times
            r["speedup"] = r["samples_per_s"] / mine[0]["samples_per_s"]
            r["ideal_speedup"] = r["ideal_samples_per_s"] / mine[0]["ideal_samples_per_s"]
            r["of_ideal"] = r["speedup"] / r["ideal_speedup"]
        rows += mine
    wide = next(r for r in rows if r["counts"] == [1, 3, 3])  # at the stage times (scale 1)
    target = {"layout": [1, 3, 3], "min_of_ideal": TARGET, "measured": wide["of_ideal"], "met": wide["of_ideal"] >= TARGET}
    results = {"meta": meta(args), "stage_ms": STAGE_MS, "batch_size": base.batch_size, "rows": rows, "target": target}
    write_results(args.out, results)
    print(f"stages sleep {'/'.join(f'{ms:g}' for ms in STAGE_MS)} ms per batch of {base.batch_size} (÷ replicas); "
          f"target: [1, 3, 3] >= {TARGET} x the ideal 3x ({'met' if target['met'] else 'missed'}, "
          f"{wide['of_ideal']:.3f})")
    print(markdown_table(["stage ms", "replicas", "layout", "processes", "samples/s", "ideal samples/s", "speed-up",
                          "ideal", "of ideal", "stage 2 step beyond its sleep, ms", "timed steps"],
                         [["/".join(f"{ms:g}" for ms in r["stage_ms"]), r["counts"], r["layout"], r["processes"],
                           r["samples_per_s"], r["ideal_samples_per_s"], r["speedup"], r["ideal_speedup"], r["of_ideal"],
                           r["stage2_extra_ms"], r["window_steps"]] for r in rows]))
    return results


if __name__ == "__main__":
    main()
