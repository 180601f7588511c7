"""The replicas' gradient all-reduce: its bus bandwidth, the number the planner's `allreduce_gbps` takes.

P processes join one replica group as a replicated stage's replicas do (`workers.replicas.join_group`:
NCCL with one GPU each where there are P GPUs, else gloo on the CPU) and time
`ReplicaGroup.average_gradients` (the project's bucketed all-reduce, with its copies in and out)
on gradients of several sizes. Bus bandwidth = 2(P-1)/P × bytes / seconds: the bytes each process
sends and receives in a ring all-reduce, per second; `pipeline/plan.allreduce_seconds` inverts it.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/allreduce.py`

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import at_least, markdown_table, meta, parse, parser, size_of, write_results
from workers.replicas import group_backend, join_group

MB = 1 << 20
SIZES = {"smoke": ([1], 3), "quick": ([1, 8, 32], 10), "full": ([1, 8, 32, 128], 20)}  # gradient MB, timed reps


def worker(rank: int, processes: int, store: str, sizes_mb: list[int], reps: int, threads: int,
           results: dict) -> None:
    """One replica: average gradients of each size `reps` times after a warm-up; rank 0 keeps the median seconds."""
    torch.set_num_threads(threads)
    gpus = torch.cuda.device_count() >= processes
    device = torch.device(f"cuda:{rank}" if gpus else "cpu")
    backend = group_backend([str(i) for i in range(processes)] if gpus else [None] * processes)
    group = join_group(store, rank, processes, backend, timeout_s=120.0, device=device)
    for size in sizes_mb:
        params = [torch.nn.Parameter(torch.zeros(size * MB // 4 // 4, device=device)) for _ in range(4)]
        for p in params:
            p.grad = torch.ones_like(p)
        times = []
        for i in range(reps + 1):  # the first, a warm-up, is not timed
            dist.barrier()
            start = time.perf_counter()
            group.average_gradients(params)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
        if rank == 0:
            results[size] = (statistics.median(times), backend)
    group.finish()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    """Time the all-reduce at each size; print the table last."""
    p = parser("allreduce", "bus bandwidth of the replicas' gradient all-reduce", threads=1)
    p.add_argument("--processes", type=at_least(1), default=2, help="replicas in the group (default: %(default)s)")
    args = parse(p, argv)
    sizes_mb, reps = SIZES[size_of(args)]
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(worker, args=(args.processes, str(Path(folder) / "store"), sizes_mb, reps, args.threads,
                                         results), nprocs=args.processes, start_method="spawn")
        measured = dict(results)
    scale = 2 * (args.processes - 1) / args.processes
    rows = [{"gradient_mb": size, "processes": args.processes, "backend": measured[size][1],
             "seconds": measured[size][0], "bus_gbps": scale * size * MB / measured[size][0] / 1e9}
            for size in sizes_mb]
    write_results(args.out, {"meta": meta(args), "rows": rows, "reps": reps})
    print("give the planner the bandwidth of the size nearest a stage's gradients: "
          "launch.py plan --gpus G --set allreduce_gbps=<bus GB/s>")
    print(markdown_table(["gradient MB", "processes", "backend", "ms (median)", "bus GB/s"],
                         [[r["gradient_mb"], r["processes"], r["backend"], 1000 * r["seconds"], r["bus_gbps"]]
                          for r in rows]))
    return {"rows": rows}


if __name__ == "__main__":
    main()
