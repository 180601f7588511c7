"""Memory each stage keeps for one training step, against global BP of the same model and batch.

Per stage: the bytes autograd saves for backward during a real StageStep.train_step (SGR's
input-gradient graph and double backward included), counted over unique storages, plus
parameter, gradient and optimizer-state bytes (pipeline/plan.py measures them). Saving as in
the paper: 1 − (largest stage / global BP). Besides the paper's ResNet-32 splits, the
memory-balanced split of `split: auto` is planned (measured at two small batches, extrapolated),
then measured for real at the full batch. The full size (no flag) adds the ImageNet models of the paper's
Table 5 at 224×224: planned from a profiling pass at batches 2 and 3 on the CPU (exact at batch
2, extrapolated to the paper's 256) and set beside the paper's per-GPU memory.
With CUDA, each stage's torch.cuda.max_memory_allocated during its step (above the memory
allocated before it) is reported too. InfoPro (its decoders beside the heads, the uint8 input image
shipped to every stage but the last) is measured beside SGR on the paper's K = 2 and 3 splits, and
planned beside SGR for ResNet-50 and -101 at 224 (Table 5's comparison).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/memory.py`

import torch

from pipeline.config import Config
from pipeline.data import pixels, stats_on, train_batches
from pipeline.plan import ModuleMemory, plan_split, step_memory
from bench.common import (bench_config, bench_data, build_steps, markdown_table, meta, names_of, parse, parser,
                          size_of, unit_spans, write_results)

MB = 1 << 20
SIZES = {  # model, batch, the paper's splits (name, K), K of the balanced splits, batch of the profiling pass
    "smoke": ("resnet8", 16, [("last_stage", 2), ("resolution", 3), ("per_block", 4)], [2], 4),
    "quick": ("resnet32", 128, [("last_stage", 2), ("resolution", 3), ("per_block", 16)], [2, 3, 4], 8),
}
SIZES["full"] = SIZES["quick"]
# The paper's Table 5 (GB per GPU at batch 256, 8 A100s): model -> (global BP, {K: SGR}).
TABLE5 = {"tv_resnet50": (21.49, {2: 17.91, 3: 15.34}), "tv_resnet101": (31.70, {3: 18.18}),
          "vit_s16": (20.70, {3: 11.73}), "swin_t": (26.78, {3: 15.83}), "swin_s": (42.60, {3: 22.83})}
IMAGENET = {  # size -> [(model, model_args, image size, K, batch, method)]; smoke: tiny models, to run the code paths
    "smoke": [("vit_s16", {"patch_size": 8, "num_layers": 3, "hidden_dim": 32, "mlp_dim": 64, "num_heads": 2}, 32, 2, 8,
               "sgr"), ("resnet8", {"width": 8}, 32, 2, 8, "infopro")],
    "quick": [],
    "full": [(model, {}, 224, k, 256, "sgr") for model, (_, sgr) in TABLE5.items() for k in sorted(sgr)]
    + [("tv_resnet50", {}, 224, 2, 256, "infopro"), ("tv_resnet50", {}, 224, 3, 256, "infopro"),
       ("tv_resnet101", {}, 224, 3, 256, "infopro")],
}
INFOPRO_K = (2, 3)  # the paper's splits InfoPro is measured on beside SGR
HEADS = {"vit_s16": "token_linear", "swin_t": "token_linear", "swin_s": "token_linear"}


def as_row(memory: ModuleMemory) -> dict[str, int]:
    """A stage's bytes as a flat record (total included; cuda_peak only where measured)."""
    row = {"saved": memory.saved, "params": memory.params, "grads": memory.grads, "optimizer": memory.optimizer,
           "total": memory.total}
    if memory.cuda_peak is not None:
        row["cuda_peak"] = memory.cuda_peak
    return row


def measure_split(cfg: Config, x: torch.Tensor, y: torch.Tensor, device: str,
                  image: torch.Tensor | None = None) -> list[dict]:
    """Every stage's memory for one config (one stage for global BP), each on its real input of one batch (InfoPro's
    stages also on the batch's uint8 `image`)."""
    steps = build_steps(cfg, bench_data(cfg), device)
    rows, delta = [], None
    for k, (step, span) in enumerate(zip(steps, unit_spans(steps))):
        memory, result = step_memory(step, x, delta, y, image if step.needs_image else None)
        rows.append({"stage": k + 1, "units": span, **as_row(memory)})
        x, delta = result.out, result.delta
    return rows


def imagenet_rows(size: str, threads: int, models: list[str] | None = None,
                  methods: list[str] | None = None) -> list[dict]:
    """The Table 5 models planned at 224×224 from a profiling pass at batches 2 and 3 (exact at 2, extrapolated to 256)."""
    rows = []
    for model, model_args, image_size, k, batch, method in IMAGENET[size]:
        if (models and model not in models) or (methods and method not in methods):
            continue
        profile = 2
        cfg = bench_config(dataset="synthetic", image_size=image_size, model=model, model_args=model_args, stages=k,
                           split="auto", batch_size=batch, profile_batch=profile, head=HEADS.get(model, "conv_linear"),
                           lam=1e4, threads=threads, method=method)
        plan = plan_split(cfg, 3, 1000, image_size)
        n = plan.n_units
        at_profile = [plan.measured[(r.start, r.stop)].total for r in plan.units]
        bp_gb, sgr = TABLE5.get(model, (None, {}))
        rows.append({"model": model, "method": method, "K": k, "cuts": plan.cuts, "image_size": image_size,
                     "profile_batch": profile,
                     "batch_size": batch, "units": n,
                     "largest_over_bp_at_profile_batch": max(at_profile) / plan.measured[(0, n)].total,
                     "largest_over_bp": plan.largest / plan.global_bp.total,
                     "global_bp_bytes": plan.global_bp.total, "stage_bytes": [m.total for m in plan.memory],
                     "compute_share": [s / sum(plan.seconds) for s in plan.seconds],
                     "paper_ratio": sgr[k] / bp_gb if k in sgr and method == "sgr" else None})
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Measure global BP, the paper's splits and the planned splits (at full size also the ImageNet models); print the tables last."""
    p = parser("memory", "bytes kept per stage for one training step, against global BP")
    full = IMAGENET["full"]
    p.add_argument("--models", type=lambda text: names_of(text, (row[0] for row in full), "model"),
                   help="comma-separated ImageNet models to plan at full size (default: all of Table 5)")
    p.add_argument("--methods", type=lambda text: names_of(text, (row[5] for row in full), "method"),
                   help="comma-separated methods (sgr, infopro) of those plans (default: both)")
    args = parse(p, argv)
    size = size_of(args)
    model, batch, paper, balanced, profile_batch = SIZES[size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = bench_config(model=model, batch_size=batch, method="sgr", threads=args.threads, device=device,
                       profile_batch=profile_batch)
    data = bench_data(cfg)
    x, y = next(train_batches(data, 0, batch, cfg.seed, False))
    x, y = x.to(device), y.to(device)
    bp = measure_split(dataclasses.replace(cfg, method="bp"), x, y, device)[0]
    splits = [(name, k, name, None) for name, k in paper]
    for k in balanced:
        plan = plan_split(dataclasses.replace(cfg, stages=k, split="auto"), data.in_channels, data.num_classes,
                          data.input_size)
        splits.append((f"balanced {plan.cuts}", k, plan.cuts, plan.largest))
    splits = [(name, k, split, predicted, "sgr") for name, k, split, predicted in splits]
    splits += [(name, k, name, None, "infopro") for name, k in paper if k in INFOPRO_K]
    image = pixels(x, *stats_on(data, x.device))
    summary, stages = [], []
    for name, k, split, predicted, method in splits:
        measured = measure_split(dataclasses.replace(cfg, stages=k, split=split, method=method), x, y, device, image)
        largest = max(s["total"] for s in measured)
        summary.append({"split": name, "method": method, "K": k, "largest_stage_bytes": largest,
                        "planned_largest_bytes": predicted, "global_bp_bytes": bp["total"],
                        "saving": 1 - largest / bp["total"]})
        stages += [{"split": name, "method": method, "K": k, **s} for s in measured]
    imagenet = imagenet_rows(size, args.threads, args.models, args.methods)
    results = {"meta": meta(args), "model": model, "batch_size": batch, "device": device, "global_bp": bp,
               "module_bytes": {f"{a}-{b - 1}": m.total for (a, b), m in plan.table.items()},
               "stages": stages, "imagenet": imagenet, "rows": summary}
    write_results(args.out, results)

    cuda_col = ["CUDA step peak MB"] if device == "cuda" else []
    print(f"{model}, batch {batch}, 3x32x32, SGR (λ = 1) or InfoPro, SGD with momentum; MB = 2^20 bytes; "
          f"device {device}; InfoPro's saved bytes include the uint8 input image its stage receives")
    print(markdown_table(["split", "method", "K", "stage", "units", "saved for backward MB", "params MB", "grads MB",
                          "optimizer MB", "total MB", *cuda_col],
                         [[s["split"], s["method"], s["K"], s["stage"], s["units"], s["saved"] / MB, s["params"] / MB,
                           s["grads"] / MB, s["optimizer"] / MB, s["total"] / MB,
                           *([s["cuda_peak"] / MB] if device == "cuda" else [])]
                          for s in [{"split": "global BP", "method": "bp", "K": 1, **bp}, *stages]]))
    if imagenet:
        print()
        print("ImageNet models, split: auto (SGR with λ = 1e4, or InfoPro; SGD, fp32), planned from a profiling pass at "
              "batches 2 and 3; largest stage / global BP, against the paper's Table 5 (GB per GPU; SGR only)")
        print(markdown_table(["model", "method", "K", "cuts", "image", "at batch 2",
                              f"at batch {imagenet[0]['batch_size']}", "paper", "global BP MB", "compute share per stage"],
                             [[r["model"], r["method"], r["K"], r["cuts"], r["image_size"],
                               r["largest_over_bp_at_profile_batch"],
                               r["largest_over_bp"], "-" if r["paper_ratio"] is None else f"{r['paper_ratio']:.3f}",
                               r["global_bp_bytes"] / MB, " / ".join(f"{c:.2f}" for c in r["compute_share"])]
                              for r in imagenet]))
    print()
    print(markdown_table(["split", "method", "K", "largest stage MB", "planned MB", "global BP MB",
                          "saving 1 − largest / BP"],
                         [[r["split"], r["method"], r["K"], r["largest_stage_bytes"] / MB,
                           "-" if r["planned_largest_bytes"] is None else r["planned_largest_bytes"] / MB,
                           r["global_bp_bytes"] / MB, r["saving"]] for r in summary]))
    return results


if __name__ == "__main__":
    main()
