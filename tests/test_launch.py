import json
import subprocess
import sys
from pathlib import Path

import pytest

import launch

ROOT = Path(__file__).parents[1]
DIGITS = ["--dataset", "digits", "--model", "resnet8", "--epochs", "1", "--batch-size", "32", "--no-progress"]


def test_cli_runs_a_job_and_flags_override_the_yaml(tmp_path, capsys):
    out = tmp_path / "run"
    assert launch.main([*DIGITS, "--method", "layerwise", "--stages", "2", "--out", str(out), "--set", "lr=0.05"]) == 0
    printed = capsys.readouterr().out
    assert "layerwise | resnet8 | K=2" in printed and "final test accuracy (last head)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["test_acc"]) == 2
    assert "lr: 0.05" in (out / "config.yaml").read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "dgl"], "error: unknown method 'dgl'"),
        (["--lam", "-1"], "error: lam must be >= 0"),
        (["--stages", "9"], "error: stages=9 is out of range: this model has 4 units"),
        (["--set", "colour=blue"], "error: unknown key 'colour' in command line"),
        (["--config", "configs/missing.yaml"], "error: config file configs/missing.yaml not found"),
        (["--dataset", "fashion_mnist", "--data-dir", "/nonexistent"], "error: Fashion-MNIST file"),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, capsys, argv, message):
    assert launch.main([*DIGITS, "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--device", "cuda"], "error: device cuda asked for but no CUDA GPU is visible; use --device cpu"),
        (["--method", "greedy"], "error: method greedy trains modules one after another; run it with --schedule sequential"),
    ],
)
def test_topology_errors_come_before_any_process_starts(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert launch.main([*DIGITS, "--out", str(tmp_path / "run"), *argv]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "run").exists()


def test_one_gpu_per_stage_is_checked_against_the_split(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    argv = [*DIGITS, "--out", str(tmp_path / "run"), "--stages", "3", "--device", "cuda", "--set", "gpus=[0,1]"]
    assert launch.main(argv) == 2
    assert capsys.readouterr().err == "error: gpus lists 2 devices but the split has 3 stages; give one GPU per stage\n"


def test_cli_as_a_program(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch.py", *DIGITS, "--out", str(tmp_path / "run"), "--set", "train_subset=256"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[eval] step 8: test accuracy per head: M1" in proc.stdout
