"""Each benchmark script runs at its smallest size, writes results.json with its keys, and prints a table last.

The numbers themselves are not judged here: they depend on the machine and its load.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
KEYS = {  # script -> keys results.json must hold, besides meta and rows
    "throughput": {"steps_per_epoch", "warmup_epochs", "epochs"},
    "schedule_overhead": {"target"},
    "transport": {"latency_us", "targets"},
    "memory": {"global_bp", "stages", "module_bytes", "imagenet"},
    "sgr_overhead": {"reps"},
    "replicas": {"stage_ms", "target"},
    "allreduce": {"reps"},
}  # bench/imagenet_gpu.py --smoke runs in scripts/gpu_check.sh --dry-run (tests/bench/test_gpu_check.py)
PLOTS = {"schedule_overhead": "schedule_overhead.png", "transport": "transport.png"}


@pytest.mark.parametrize("name", sorted(KEYS))
def test_script_runs_at_its_smallest_size(tmp_path, name):
    out = tmp_path / name
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert {"meta", "rows"} | KEYS[name] <= results.keys()
    assert results["rows"] and results["meta"]["size"] == "smoke" and results["meta"]["threads"] >= 1
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("| ") and set(lines[-len(results["rows"]) - 1]) <= set("|-")
    if name in PLOTS:
        assert (out / PLOTS[name]).stat().st_size > 0
    if name == "transport":  # every link's round trip, and the bare zmq floor they are read against
        assert all(results["latency_us"][link] > 0 for link in ("ipc", "tcp", "shm", "bare_zmq"))


@pytest.mark.parametrize("name,flags,message", [
    ("throughput", ["--threads", "-1"], "argument --threads: must be at least 1, got -1"),
    ("sgr_overhead", ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    ("schedule_overhead", ["--depth", "0"], "argument --depth: must be at least 1, got 0"),
    ("schedule_overhead", ["--stages", "1"], "argument --stages: must be at least 2, got 1"),
    ("schedule_overhead", ["--delays", "0"], "argument --delays: must be a positive number of ms, got 0"),
    ("schedule_overhead", ["--delays", "nan"], "argument --delays: must be a positive number of ms, got nan"),
    ("replicas", ["--gpus", "2"], "argument --gpus: must be at least 3, got 2"),  # one process per stage at least
    ("allreduce", ["--processes", "x"], "argument --processes: 'x' is not an integer"),
    ("memory", ["--models", "tv_resnet50,foo"], "argument --models: unknown model foo; choose from swin_s, swin_t,"),
    ("memory", ["--methods", "bar"], "argument --methods: unknown method bar; choose from infopro, sgr"),
])
def test_nonsense_arguments_are_a_usage_line(tmp_path, name, flags, message):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--smoke", *flags, "--out",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"bench/{name}.py: error: {message}" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "results.json").exists()


def test_sgr_overhead_on_the_imagenet_configs_times_every_module_and_global_bp(tmp_path):
    """--imagenet --smoke: the ResNet-50 and ViT-S K = 3 configs, shrunk to run on the CPU (on a GPU: batch 64)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sgr_overhead.py"), "--smoke", "--imagenet", "--out",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["model"], r["stage"]) for r in rows] == [(m, s) for m in ("tv_resnet18", "vit_s16")
                                                         for s in (1, 2, 3, "all")]
    for r in rows:  # global BP's step only in each model's `all` row
        assert r["sgr_ms"] > 0 and r["layerwise_ms"] > 0
        assert (r["bp_ms"] is not None) == (r["stage"] == "all") and (r["bp_ms"] is None or r["bp_ms"] > 0)
    if not torch.cuda.is_available():
        gpu = subprocess.run([sys.executable, str(ROOT / "bench" / "sgr_overhead.py"), "--imagenet", "--out",
                              str(tmp_path / "gpu")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert gpu.returncode == 1 and gpu.stderr == ("bench/sgr_overhead.py --imagenet needs a CUDA GPU (add --smoke "
                                                      "to run its code on the CPU)\n")


def test_schedule_overhead_runs_only_the_stages_and_delays_asked_for(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "schedule_overhead.py"), "--smoke", "--stages", "3",
                           "--delays", "2", "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(r["K"], r["delay_ms"]) for r in json.loads((tmp_path / "results.json").read_text())["rows"]] == [(3, 2.0)]
    assert "target at 20 ms: efficiency >= 0.95 (not measured)" in proc.stdout
