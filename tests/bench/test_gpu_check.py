"""scripts/gpu_check.sh: its arguments, and its dry run (the CPU half of every check, one table) on any machine."""
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[2]
CHECKS = ["pytest tests/gpu", "transport stress, 3 processes", "K=3 pipeline vs sequential", "K=3 transport auto vs zmq",
          "kill a stage, resume", "torchrun --nproc-per-node 3", "plan + peak memory", "bench/imagenet_gpu.py"]


def test_unknown_arguments_are_one_line_and_exit_2():
    proc = subprocess.run(["scripts/gpu_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "error: unknown argument '--fast'; usage: scripts/gpu_check.sh [--dry-run]\n"


def test_without_a_gpu_the_full_check_says_to_use_the_dry_run():
    if torch.cuda.is_available():
        return  # on a GPU machine the full check is what scripts/gpu_check.sh runs
    proc = subprocess.run([".venv/bin/python", "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: no CUDA GPU is visible; run with --dry-run for the CPU half of the checks\n"


def test_the_dry_run_passes_every_check_and_prints_one_table():
    proc = subprocess.run(["scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.strip().splitlines()[-len(CHECKS) - 2:]
    assert table[0] == "| check | result | detail | s |" and set(table[1]) <= set("|-")
    assert [row.split(" | ")[0].removeprefix("| ") for row in table[2:]] == CHECKS
    assert all(row.split(" | ")[1] == "pass" for row in table[2:])
    assert "pipeline == sequential to the bit" in proc.stdout and "resumed == uninterrupted" in proc.stdout


def test_a_time_limit_still_prints_the_table_of_what_finished(own_temp):
    temp = own_temp
    proc = subprocess.Popen([".venv/bin/python", "bench/gpu_check.py", "--dry-run"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(temp)})
    first = proc.stderr.readline()  # each check's line comes when it ends: the signal lands in the second check
    assert first.startswith("transport stress, 3 processes: pass"), first
    deadline = time.time() + 120
    while not list(temp.glob("*/launcher.pid")) and time.time() < deadline:  # its launch.py has started stages
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    table = out.strip().splitlines()[-len(CHECKS) - 2:]
    assert table[0] == "| check | result | detail | s |"
    results = [row.split(" | ")[1] for row in table[2:]]
    assert results[:2] == ["pass", "pass"] and "OutOfTime: stopped by the time limit" in table[4]
    assert results[3:] == ["not run"] * (len(CHECKS) - 3)
    # the launcher under way was stopped as Ctrl-C would stop it, so it cleaned up: no runs folder (its stages wrote
    # nothing after the check removed it), no ipc folder (sgr-*), no forkserver socket folder (pymp-*)
    left = sorted(p.name for p in temp.iterdir())
    assert not [name for name in left if name.startswith(("sgr-", "pymp-"))], left
