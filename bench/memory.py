"""Memory each stage keeps for one training step, against global BP of the same model and batch.

Per stage: the bytes autograd saves for backward during a real StageStep.train_step (SGR's
input-gradient graph and double backward included), counted over unique storages with
torch.autograd.graph.saved_tensors_hooks, parameters excluded; plus parameter, gradient and
optimizer-state bytes. Saving as in the paper: 1 − (largest stage / global BP). Besides the
paper's ResNet-32 splits, the split that minimises the largest stage is searched over all cut
points with the bytes of every possible module (every range of units) measured at a small
batch and scaled, then measured for real.
With CUDA, each stage's torch.cuda.max_memory_allocated during its step (above the memory
allocated before it) is reported too.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/memory.py`

import torch

from pipeline.config import Config
from pipeline.data import train_batches
from pipeline.step import StageStep, StepOutput
from bench.common import (bench_config, bench_data, build_steps, markdown_table, meta, parse, parser, size_of,
                          unit_spans, write_results)

MB = 1 << 20
SIZES = {  # model, batch, the paper's splits (name, K), K of the balanced splits, batch of the split search
    "smoke": ("resnet8", 16, [("last_stage", 2), ("resolution", 3), ("per_block", 4)], [2], 4),
    "quick": ("resnet32", 128, [("last_stage", 2), ("resolution", 3), ("per_block", 16)], [2, 3, 4], 8),
}
SIZES["full"] = SIZES["quick"]  # the counts are exact: a longer run measures nothing more


def saved_bytes(fn: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of the unique storages autograd saves for backward while fn runs (storages in `exclude` left out)."""
    kept: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude and storage.nbytes():
            kept[storage.data_ptr()] = storage  # held until the end: no address is reused meanwhile
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storage.nbytes() for storage in kept.values())


def stage_memory(step: StageStep, x: torch.Tensor, delta: torch.Tensor | None, y: torch.Tensor) -> tuple[dict[str, int], StepOutput]:
    """Saved-for-backward, parameter, gradient and optimizer-state bytes of one real train_step, and its output."""
    params = [*step.module.parameters(), *step.head.parameters()]
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    outputs = []
    saved = saved_bytes(lambda: outputs.append(step.train_step(x, delta, y)), {p.untyped_storage().data_ptr() for p in params})
    result = {
        "saved": saved,
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": sum(v.numel() * v.element_size() for s in step.optimizer.state.values()
                         for v in s.values() if torch.is_tensor(v)),
    }
    result["total"] = result["saved"] + result["params"] + result["grads"] + result["optimizer"]
    if x.is_cuda:
        result["cuda_peak"] = torch.cuda.max_memory_allocated() - before  # above what was allocated before the step
    return result, outputs[0]


def measure_split(cfg: Config, x: torch.Tensor, y: torch.Tensor, device: str) -> list[dict]:
    """Every stage's memory for one config (one stage for global BP), each on its real input of one batch."""
    steps = build_steps(cfg, bench_data(cfg), device)
    rows, delta = [], None
    for k, (step, span) in enumerate(zip(steps, unit_spans(steps))):
        memory, result = stage_memory(step, x, delta, y)
        rows.append({"stage": k + 1, "units": span, **memory})
        x, delta = result.out, result.delta
    return rows


def range_costs(cfg: Config, x: torch.Tensor, y: torch.Tensor, device: str, small_batch: int) -> dict[tuple[int, int], int]:
    """Total bytes of a module made of units a..b-1, for every a < b, measured at a small batch and scaled to the full one.

    A module cut at a and b is the stage it would be in any split with those cut points (SGR
    and a local head unless it is first or last); its input is unit a-1's real activation, with
    a zero δ where SGR needs one (the bytes do not depend on values). Saved activations grow in
    proportion to the batch; parameters, gradients and optimizer state do not.
    """
    bp = build_steps(bench_config(**{**cfg.to_dict(), "method": "bp"}), bench_data(cfg), device)[0]
    n = len(bp.module)
    acts = [x[:small_batch]]
    with torch.no_grad():
        for unit in bp.module:
            acts.append(unit(acts[-1]))
    scale = x.shape[0] / small_batch
    costs = {}
    for a in range(n):
        for b in range(a + 1, n + 1):
            cuts = [c for c in (a, b) if 0 < c < n]
            steps = build_steps(bench_config(**{**cfg.to_dict(), "stages": len(cuts) + 1, "split": cuts}),
                                bench_data(cfg), device)
            step = steps[1 if a > 0 else 0]
            delta = torch.zeros_like(acts[a]) if step.needs_delta else None
            memory, _ = stage_memory(step, acts[a], delta, y[:small_batch])
            costs[(a, b)] = round(scale * memory["saved"]) + memory["params"] + memory["grads"] + memory["optimizer"]
    return costs


def balanced_cuts(costs: dict[tuple[int, int], int], n: int, k: int) -> tuple[list[int], int]:
    """Cut points into k modules that minimise the largest module's measured bytes (dynamic programming)."""
    best = {(1, b): (costs[(0, b)], []) for b in range(1, n + 1)}  # (modules, units covered) -> (largest, cuts)
    for m in range(2, k + 1):
        for b in range(m, n + 1):
            best[(m, b)] = min((max(best[(m - 1, a)][0], costs[(a, b)]), best[(m - 1, a)][1] + [a])
                               for a in range(m - 1, b))
    largest, cuts = best[(k, n)]
    return cuts, largest


def main(argv: list[str] | None = None) -> dict:
    """Measure global BP, the paper's splits and the balanced splits; print the tables last."""
    args = parse(parser("memory", "bytes kept per stage for one training step, against global BP"), argv)
    model, batch, paper, balanced, small_batch = SIZES[size_of(args)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = bench_config(model=model, batch_size=batch, method="sgr", threads=args.threads)
    x, y = next(train_batches(bench_data(cfg), 0, batch, cfg.seed, False))
    x, y = x.to(device), y.to(device)
    bp = measure_split(bench_config(**{**cfg.to_dict(), "method": "bp"}), x, y, device)[0]
    costs = range_costs(cfg, x, y, device, small_batch)
    n_units = max(b for _, b in costs)
    splits = [(name, k, name, None) for name, k in paper]
    for k in balanced:
        cuts, predicted = balanced_cuts(costs, n_units, k)
        splits.append((f"balanced {cuts}", k, cuts, predicted))
    summary, stages = [], []
    for name, k, split, predicted in splits:
        measured = measure_split(bench_config(**{**cfg.to_dict(), "stages": k, "split": split}), x, y, device)
        largest = max(s["total"] for s in measured)
        summary.append({"split": name, "K": k, "largest_stage_bytes": largest, "searched_largest_bytes": predicted,
                        "global_bp_bytes": bp["total"], "saving": 1 - largest / bp["total"]})
        stages += [{"split": name, "K": k, **s} for s in measured]
    results = {"meta": meta(args), "model": model, "batch_size": batch, "device": device, "global_bp": bp,
               "module_bytes": {f"{a}-{b - 1}": v for (a, b), v in costs.items()}, "stages": stages, "rows": summary}
    write_results(args.out, results)

    cuda_col = ["CUDA step peak MB"] if device == "cuda" else []
    print(f"{model}, batch {batch}, 3x32x32, SGR (λ = 1), SGD with momentum; MB = 2^20 bytes; device {device}")
    print(markdown_table(["split", "K", "stage", "units", "saved for backward MB", "params MB", "grads MB",
                          "optimizer MB", "total MB", *cuda_col],
                         [[s["split"], s["K"], s["stage"], s["units"], s["saved"] / MB, s["params"] / MB,
                           s["grads"] / MB, s["optimizer"] / MB, s["total"] / MB,
                           *([s["cuda_peak"] / MB] if device == "cuda" else [])]
                          for s in [{"split": "global BP", "K": 1, **bp}, *stages]]))
    print()
    print(markdown_table(["split", "K", "largest stage MB", "global BP MB", "saving 1 − largest / BP"],
                         [[r["split"], r["K"], r["largest_stage_bytes"] / MB, r["global_bp_bytes"] / MB, r["saving"]]
                          for r in summary]))
    return results


if __name__ == "__main__":
    main()
