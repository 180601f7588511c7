"""Each benchmark script runs at its smallest size, writes results.json with its keys, and prints a table last.

The numbers themselves are not judged here: they depend on the machine and its load.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
