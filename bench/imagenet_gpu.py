"""Table 5's ResNet-50 and ViT-S runs with K = 3 on one GPU, against global BP on the same GPU.

Each run takes its config from configs/imagenet/ (bf16, channels_last for ResNet, split: auto)
on synthetic 224×224 data: global BP trains in this process, then the K-stage pipeline (every
stage a process on the same GPU, CUDA IPC between them) trains for the same number of steps.
Reported: samples/s after warm-up, and each process's peak torch.cuda.max_memory_allocated
against global BP's. `--smoke` runs the same code on the CPU with tiny models (what the tests
run); its memory column is then each process's peak resident set, not comparable with BP.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/imagenet_gpu.py`

import torch
import yaml

from pipeline.config import Config
from pipeline.data import steps_per_epoch, to_device
from pipeline.plan import resolve_auto_split
from pipeline.schedule import run_epochs
from pipeline.trainer import train_batch
from bench.common import ROOT, bench_config, bench_data, build_steps, markdown_table, meta, parse, parser, run_pipeline, size_of, write_results

GiB = 1 << 30
CONFIGS = ["imagenet_resnet50_k3_sgr.yaml", "imagenet_vit_s16_k3_sgr.yaml"]
TINY = {  # --smoke: the same configs shrunk to run in seconds on a CPU
    "imagenet_resnet50_k3_sgr.yaml": {"model": "tv_resnet18", "head_width": 16},
    "imagenet_vit_s16_k3_sgr.yaml": {"model_args": {"patch_size": 8, "num_layers": 3, "hidden_dim": 32, "mlp_dim": 64,
                                                    "num_heads": 2}},
}
SIZES = {"smoke": (8, 4, 2), "check": (64, 20, 5), "quick": (256, 100, 10), "full": (256, 300, 20)}  # batch, timed, warm-up
# "check": the reduced size scripts/gpu_check.sh runs (a minute or two on one GPU)


def run_config(name: str, size: str, threads: int) -> Config:
    """The ImageNet config on synthetic data, sized for this benchmark, on the GPU (the CPU for --smoke)."""
    batch, steps, warmup = SIZES[size]
    path = ROOT / "configs" / "imagenet" / name
    values = {k: v for k, v in yaml.safe_load(path.read_text()).items()
              if k not in ("dataset", "data_dir", "augment", "loader_workers", "out", "epochs")}
    values.update(batch_size=batch, eval_batch_size=batch, threads=threads, profile_batch=2)
    if size == "smoke":
        values.update(image_size=32, device="cpu", amp="fp32", channels_last=False, **TINY[name])
    total = steps + warmup
    cfg = bench_config(**values, train_subset=min(512, batch * total))  # the synthetic set holds 512 images
    epochs = math.ceil(total / steps_per_epoch(bench_data(cfg), batch))
    return dataclasses.replace(cfg, epochs=epochs, eval_every=epochs * total, log_every=1,
                               out=str(ROOT / "runs" / "bench" / "imagenet_gpu" / Path(name).stem))


def planned_config(name: str, size: str, threads: int) -> tuple[Config, Any]:
    """run_config with its `split: auto` planned as launch.py plans it (least-memory cuts): (config, the plan)."""
    cfg = run_config(name, size, threads)
    data = bench_data(cfg)
    return resolve_auto_split(cfg, data.in_channels, data.num_classes, data.input_size)


def global_bp(cfg: Config, steps: int, warmup: int) -> tuple[float, int | None]:
    """Samples/s of global BP in this process after `warmup` steps, and its peak CUDA memory (None on the CPU)."""
    bp = dataclasses.replace(cfg, method="bp", split=None)
    device = torch.device(bp.device)
    data = bench_data(bp)
    model = build_steps(bp, data, bp.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    done, start = 0, time.perf_counter()
    # the run loop, as the pipeline's stage 1 walks it: batches drawn one ahead, normalised on the device
    for _, _, batches in run_epochs(bp, data, steps_per_epoch(data, bp.batch_size), device=device):
        for s in batches:
            if done == warmup:
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
            train_batch(model, s.x, to_device(s.y, device))
            done += 1
            if done == warmup + steps:
                break
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    del model
    if cuda:
        torch.cuda.empty_cache()  # the stage processes share this GPU
    return steps * bp.batch_size / seconds, peak


def main(argv: list[str] | None = None) -> dict:
    """Global BP, then the K-stage pipeline, per config; print the table last."""
    p = parser("imagenet_gpu", "ResNet-50 and ViT-S, K=3, pipeline on one GPU vs global BP", threads=1)
    p.add_argument("--check", action="store_true", help="the reduced size of scripts/gpu_check.sh (batch 64, 20 steps)")
    args = parse(p, argv)
    size = "check" if args.check else size_of(args)
    _, steps, warmup = SIZES[size]
    if size != "smoke" and not torch.cuda.is_available():
        sys.exit("bench/imagenet_gpu.py needs a CUDA GPU (use --smoke to run its code on the CPU)")
    rows = []
    for name in CONFIGS:
        cfg, plan = planned_config(name, size, args.threads)
        bp_rate, bp_peak = global_bp(cfg, steps, warmup)
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
        pipe = run_pipeline(cfg, warmup)
        peaks = pipe["peak_memory_bytes"]
        rows.append({"config": name, "model": cfg.model, "K": cfg.stages, "cuts": cfg.split, "batch_size": cfg.batch_size,
                     "bp_samples_per_s": bp_rate, "pipeline_samples_per_s": pipe["samples_per_s"],
                     "speedup": pipe["samples_per_s"] / bp_rate, "efficiency": pipe["efficiency"],
                     "bp_peak_bytes": bp_peak, "stage_peak_bytes": peaks, "peak_memory_kind": pipe["peak_memory_kind"],
                     "largest_over_bp": max(peaks) / bp_peak if bp_peak else None,
                     "planned_largest_over_bp": plan.largest / plan.global_bp.total})
    write_results(args.out, {"meta": {**meta(args), "size": size}, "steps": steps, "warmup_steps": warmup, "rows": rows})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and size != "smoke" else "cpu"
    print(f"{steps} timed steps after {warmup}, synthetic data, {device}; GiB = 2^30 bytes; "
          "peak = torch.cuda.max_memory_allocated per process (--smoke: resident set)")
    print(markdown_table(
        ["model", "K", "cuts", "batch", "BP samples/s", "pipeline samples/s", "pipeline / BP", "BP peak GiB",
         "stage peaks GiB", "largest / BP", "planned largest / BP"],
        [[r["model"], r["K"], r["cuts"], r["batch_size"], r["bp_samples_per_s"], r["pipeline_samples_per_s"],
          r["speedup"], "-" if r["bp_peak_bytes"] is None else r["bp_peak_bytes"] / GiB,
          " / ".join(f"{b / GiB:.2f}" for b in r["stage_peak_bytes"]),
          "-" if r["largest_over_bp"] is None else r["largest_over_bp"], r["planned_largest_over_bp"]] for r in rows]))
    return {"rows": rows}


if __name__ == "__main__":
    main()
