"""Replicated stages (pipeline × data parallel, gloo on the CPU) against the one-process sequential reference."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import complete_checkpoints
from pipeline.data import data_shape, load_config_data
from pipeline.trainer import SequentialTrainer
from tests.workers.test_pipeline import (ROOT, assert_a_frozen_process_is_named, assert_a_killed_process_is_named,
                                         eval_records, pipeline_states, reference, run_pipeline, small_config,
                                         start_long_run)
from tests.workers.test_replicas import ghost
from workers.launcher import run_spawned

TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32 sums in another order; measured: at most 6e-7 of a tensor's largest entry


def assert_close_to(trainer, states) -> None:
    """Every parameter and buffer of every stage within TOLERANCE of the reference's."""
    for k, (lm, state) in enumerate(zip(trainer.local, states)):
        for part, module in (("module", lm.module), ("head", lm.head)):
            expected = module.state_dict()
            assert expected.keys() == state[part].keys()
            for name, value in expected.items():
                torch.testing.assert_close(state[part][name], value.cpu(), **TOLERANCE, msg=f"stage {k + 1} {part}.{name}")


def assert_same_evaluations(run_dir: Path, reference_dir: Path) -> None:
    got, expected = eval_records(run_dir), eval_records(reference_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.01)  # a sample near a decision boundary may flip
        assert a["delta_loss"] == pytest.approx(b["delta_loss"], abs=1e-4)  # ΔL_k: replica 0 probes the whole probe batch


@pytest.mark.parametrize("counts", [[1, 2], [2, 2], [1, 2, 2]])
def test_replicated_stages_with_sync_bn_equal_the_reference_at_the_same_global_batch(tmp_path, counts):
    cfg = small_config(tmp_path, stages=len(counts), replicas=counts, epochs=1, eval_every=3)
    result = run_pipeline(cfg)
    assert result["replicas"] == counts and result["links"] == ["shm"] * (len(counts) - 1)
    trainer, _ = reference(cfg, tmp_path)
    assert_close_to(trainer, pipeline_states(Path(cfg.out), len(counts)))
    assert_same_evaluations(Path(cfg.out), tmp_path / "reference")


def test_replicas_pass_each_other_their_rows_of_infopro_images_with_sgr_on_infopro_losses(tmp_path):
    cfg = small_config(tmp_path, stages=3, replicas=[1, 2, 2], method="sgr", local_loss="infopro", epochs=1,
                       eval_every=3)
    run_pipeline(cfg)
    trainer, _ = reference(cfg, tmp_path)
    assert_close_to(trainer, pipeline_states(Path(cfg.out), 3))


def test_equal_counts_without_sync_bn_equal_a_reference_that_normalises_per_shard(tmp_path):
    cfg = small_config(tmp_path, stages=2, replicas=2, sync_bn=False, epochs=1, eval_every=3)
    run_pipeline(cfg)
    trainer, _ = reference(cfg, tmp_path)  # a plain reference: per-shard statistics make a real difference
    with pytest.raises(AssertionError):
        assert_close_to(trainer, pipeline_states(Path(cfg.out), 2))
    trainer = SequentialTrainer(dataclasses.replace(cfg, schedule="sequential"), load_config_data(cfg), tmp_path / "ghost")
    for lm in trainer.local:
        ghost(lm.module, 2)
        ghost(lm.head, 2)
    trainer.run()
    assert_close_to(trainer, pipeline_states(Path(cfg.out), 2))


def test_a_checkpoint_resumes_under_another_replica_layout(tmp_path):
    cfg = small_config(tmp_path, stages=3, replicas=[1, 2, 2], checkpoint_every=6, keep_checkpoints=5)  # 12 steps
    run_pipeline(cfg)
    full = pipeline_states(Path(cfg.out), 3)
    moved = tmp_path / "moved"  # as if the run had died after step 6 and came back on other GPUs
    shutil.copytree(cfg.out, moved)
    shutil.rmtree(moved / "checkpoints" / "step00000012")
    resume = complete_checkpoints(moved)[-1]
    assert resume.step == 6
    other = dataclasses.replace(cfg, out=str(moved), replicas=[2, 1, 2])
    result = run_spawned(other, 3, data_shape(load_config_data(cfg), 32), resume)
    assert result["replicas"] == [2, 1, 2]
    for a, b in zip(full, pipeline_states(moved, 3)):
        for part in ("module", "head"):
            for name in a[part]:
                torch.testing.assert_close(b[part][name], a[part][name], **TOLERANCE)
    assert [r["step"] for r in eval_records(moved)] == [r["step"] for r in eval_records(Path(cfg.out))]


def test_a_killed_replica_stops_the_run_within_ten_seconds_and_is_named(tmp_path):
    proc, pids = start_long_run(tmp_path, "--replicas", "[1,2,1]")
    assert len(pids) == 4  # stage 1, stage 2 replicas 1 and 2, stage 3
    err = assert_a_killed_process_is_named(proc, pids, 2, "stage 2 replica 2")
    # replica 1, left in a SyncBatchNorm all-reduce or the gradients', says so in a line: no traceback
    assert "Traceback" not in err, err


def test_a_frozen_replica_is_named_by_its_missing_heartbeat(tmp_path):
    # stage 1 replica 2 frozen; replica 1 waits in the all-reduce with its heartbeat going on
    assert_a_frozen_process_is_named(tmp_path, 1, "stage 1 replica 2", "--replicas", "[2,1,1]")


def test_torchrun_maps_ranks_to_replicas_and_equals_the_reference(tmp_path):
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "launch.py",
           "--stages", "2", "--replicas", "[1,2]", "--dataset", "digits", "--epochs", "1", "--batch-size", "32",
           "--threads", "1", "--lam", "50", "--no-progress", "--out", str(out), "--set", "train_subset=128",
           "--set", "lr=0.05"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = small_config(tmp_path, stages=2, epochs=1, train_subset=128, batch_size=32, lam=50.0, lr=0.05,
                       eval_batch_size=1000, log_every=20)
    trainer, _ = reference(cfg, tmp_path)
    assert_close_to(trainer, pipeline_states(out, 2))
    wrong = subprocess.run([*cmd[:5], "2", *cmd[6:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0
    assert ("torchrun started 2 processes but the run has 2 stages with replicas [1, 2] (3 processes); "
            "use --nproc-per-node 3") in wrong.stderr


def test_torchrun_with_replicas_auto_runs_the_planned_layout(tmp_path):
    out = tmp_path / "auto"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "launch.py",
           "--stages", "2", "--replicas", "auto", "--dataset", "digits", "--epochs", "1", "--batch-size", "32",
           "--threads", "1", "--no-progress", "--out", str(out), "--set", "train_subset=128"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads((out / "summary.json").read_text())["replicas"]
    assert sorted(counts) == [1, 2]  # rank 0 planned 3 processes (each its own device) for the 2 stages
    assert f"replicas:\n- {counts[0]}\n- {counts[1]}\n" in (out / "config.yaml").read_text()  # a resume keeps them
