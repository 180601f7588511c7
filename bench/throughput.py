"""Training throughput: global BP and sequential local training in one process, and the K-process pipeline.

All three run the same workload with the project's own code: epochs of training batches, each
followed by an evaluation of the test set (synthetic data: 4 batches of 128, then 128 test
images). Timing starts after `warmup` epochs, so start-up, pipeline fill and first-step
allocations are excluded. For the pipeline, every stage reports its cumulative busy and idle
seconds; over the same window they give each stage's busy and idle fraction and its own
throughput (samples / busy seconds), and the pipeline efficiency is the achieved throughput
over the slowest stage's.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/throughput.py`

from pipeline.data import steps_per_epoch
from bench.common import (bench_config, bench_data, markdown_table, meta, one_process, parse, parser, run_pipeline,
                          size_of, write_results)

SIZES = {  # model, batch, splits K, methods, warm-up epochs, timed epochs (4 steps each at batch 128)
    "smoke": ("resnet8", 64, [2], ["sgr"], 1, 1),
    "quick": ("resnet32", 128, [2, 3], ["layerwise", "sgr"], 2, 5),
    "full": ("resnet32", 128, [2, 3], ["layerwise", "sgr"], 2, 25),
}


def main(argv: list[str] | None = None) -> dict:
    """Measure global BP, sequential local training and the pipeline; print the table last."""
    args = parse(parser("throughput", "samples/s of global BP, sequential local training and the pipeline"), argv)
    model, batch, splits, methods, warmup, epochs = SIZES[size_of(args)]
    base = bench_config(model=model, batch_size=batch, epochs=warmup + epochs, threads=args.threads,
                        out=str(Path(args.out) / "run"))
    spe = steps_per_epoch(bench_data(base), batch)
    rows = [{"run": "global BP, 1 process", "K": 1, "sgr": None, "processes": 1, "threads": args.threads,
             "samples_per_s": one_process(bench_config(**{**base.to_dict(), "method": "bp"}), warmup, epochs)}]
    for k in splits:
        for method in methods:
            cfg = bench_config(**{**base.to_dict(), "stages": k, "method": method})
            rows.append({"run": "sequential local, 1 process", "K": k, "sgr": method == "sgr", "processes": 1,
                         "threads": args.threads, "samples_per_s": one_process(cfg, warmup, epochs)})
    for k in splits:
        for method in methods:
            threads = max(1, (os.cpu_count() or 1) // k)
            cfg = bench_config(**{**base.to_dict(), "stages": k, "method": method, "threads": threads, "log_every": spe})
            result = run_pipeline(cfg, warmup * spe)
            rows.append({"run": "pipeline, K processes", "K": k, "sgr": method == "sgr", "processes": k,
                         "threads": threads, **result})
    bp = rows[0]["samples_per_s"]
    for row in rows:
        row["vs_bp"] = row["samples_per_s"] / bp
    results = {"meta": meta(args), "model": model, "batch_size": batch, "warmup_epochs": warmup, "epochs": epochs,
               "steps_per_epoch": spe, "rows": rows}
    write_results(args.out, results)

    def pct(row: dict, key: str) -> str:
        return " / ".join(f"{100 * s[key]:.0f}" for s in row["per_stage"]) if "per_stage" in row else "-"

    table = [[r["run"], r["K"], "-" if r["sgr"] is None else "yes" if r["sgr"] else "no",
              f"{r['processes']} × {r['threads']}", r["samples_per_s"], r["vs_bp"], pct(r, "busy_fraction"),
              pct(r, "idle_fraction"), r.get("slowest_stage_samples_per_s", "-"), r.get("efficiency", "-")]
             for r in rows]
    print(f"{model}, batch {batch}, synthetic 3x32x32, {os.cpu_count()} cores; timed over {epochs} epochs "
          f"({epochs * spe} steps) after {warmup} warm-up epochs")
    print(markdown_table(["run", "K", "SGR", "processes × threads", "samples/s", "× global BP", "busy % per stage",
                          "idle % per stage", "slowest stage samples/s", "pipeline efficiency"], table))
    return results


if __name__ == "__main__":
    main()
