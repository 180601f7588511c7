"""The study runner: a tiny study runs every arm × seed, writes the table and plots, skips finished runs and resumes
an interrupted one."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.rundir import lock_run_dir

ROOT = Path(__file__).parents[2]
STUDY = """
base: {dataset: digits, model: mlp3, model_args: {width: 16}, stages: null, split: per_block, head: etf,
       last_head: etf, epochs: 1, batch_size: 64, lr: 0.05, threads: 1, tensorboard: false, probe_size: 64,
       eval_every: 10, log_every: 5, track_sgr: true}
arms:
  fa: {method: fa}
  sgr: {method: sgr, lam: 1.0}
seeds: [0, 1]
"""


def run(study: Path, out: Path, expect: int = 0) -> str:
    done = subprocess.run([sys.executable, "experiments/study.py", str(study), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == expect, done.stderr
    return done.stdout if expect == 0 else done.stderr


def test_tiny_study_writes_the_table_and_skips_finished_runs(tmp_path):
    study, out = tmp_path / "tiny.yaml", tmp_path / "out"
    study.write_text(STUDY)
    first = run(study, out)
    assert first.count("training ->") == 4
    rows = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in rows] == ["fa", "sgr"] and all(len(r["test_acc"]) == 2 for r in rows)
    sgr = rows[1]
    assert abs(sgr["mean"] - sum(sgr["test_acc"]) / 2) < 1e-9 and sgr["std"] > 0 and sgr["final_sgr"] > 0
    table = (out / "results.md").read_text()
    assert f"| sgr | method=sgr, lam=1.0 | {sgr['mean']:.2f} ± {sgr['std']:.2f} |" in table
    assert first.strip().endswith(table.strip().splitlines()[-1])  # the table is printed last
    assert {p.name for p in (out / "plots").iterdir()} == {"accuracy.png", "sgr.png", "delta_loss.png"}
    stamp = (out / "sgr" / "seed1" / "summary.json").stat().st_mtime_ns
    second = run(study, out)
    assert "training ->" not in second and second.count("done before, skipped") == 4
    assert (out / "sgr" / "seed1" / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text()) == rows
    # linear_probe added to a finished study: only the probes run (not of a diverged run, which has nothing to
    # probe), and the table gains their column
    diverged = out / "fa" / "seed1"
    (diverged / "summary.json").write_text(json.dumps({"final_test_acc": None, "diverged": "loss is nan"}))
    shutil.rmtree(diverged / "checkpoints")
    study.write_text(STUDY + "linear_probe: 2\n")
    third = run(study, out)
    assert "training ->" not in third and third.count(": linear probe\n") == 3
    probed = json.loads((out / "results.json").read_text())
    assert [len(r["probe_acc"]) for r in probed] == [1, 2]
    assert all(0 <= a <= 100 for r in probed for a in r["probe_acc"])
    assert "linear probe % (mean ± std)" in (out / "results.md").read_text()
    assert run(study, out).count("done before, skipped") == 4


def test_a_bad_linear_probe_key_is_one_line(tmp_path):
    study = tmp_path / "bad.yaml"
    study.write_text(STUDY + "linear_probe: yes\n")
    done = subprocess.run([sys.executable, "experiments/study.py", str(study)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "`linear_probe` must be a number of epochs" in done.stderr


ONE_RUN = """
base: {dataset: digits, model: mlp3, model_args: {width: 16}, stages: null, split: per_block, head: etf,
       last_head: etf, epochs: 2, batch_size: 64, lr: 0.05, threads: 1, tensorboard: false, probe_size: 0,
       eval_every: 0, log_every: 5, checkpoint_every: 10, keep_checkpoints: 10}
arms:
  sgr: {method: sgr, lam: 1.0}
seeds: [0]
"""


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path):
    study, out = tmp_path / "one.yaml", tmp_path / "out"
    study.write_text(ONE_RUN)
    run(study, out)
    run_dir = out / "sgr" / "seed0"
    finished = json.loads((run_dir / "summary.json").read_text())
    records = (run_dir / "metrics.jsonl").read_text()
    # what a kill after step 20 leaves: no summary, and no checkpoint past 20 (its records are cut back on resume)
    (run_dir / "summary.json").unlink()
    for later in [c for c in (run_dir / "checkpoints").iterdir() if int(c.name.removeprefix("step")) > 20]:
        shutil.rmtree(later)
    second = run(study, out)
    assert f"resuming {run_dir} from step 20" in second and "training ->" in second
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["final_test_acc"] == finished["final_test_acc"]  # the sequential trainer resumes bit-exactly
    assert [json.loads(r)["step"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(r)["step"] for r in records.splitlines()]  # nothing lost, nothing twice
    # killed before its first checkpoint: trained from the start, over what it left
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "checkpoints")
    third = run(study, out)
    assert "resuming" not in third
    assert json.loads((run_dir / "summary.json").read_text())["final_test_acc"] == finished["final_test_acc"]


def test_an_interrupted_run_of_a_changed_arm_and_a_run_in_use_are_one_line(tmp_path):
    study, out = tmp_path / "one.yaml", tmp_path / "out"
    study.write_text(ONE_RUN)
    run(study, out)
    run_dir = out / "sgr" / "seed0"
    (run_dir / "summary.json").unlink()
    held = lock_run_dir(run_dir)  # what a second study on the same folder holds
    try:
        assert f"{run_dir} is in use by another run" in run(study, out, expect=2)
    finally:
        held.close()
    study.write_text(ONE_RUN.replace("split: per_block", "split: [1]"))
    error = run(study, out, expect=2)
    assert len(error.strip().splitlines()) == 1 and f"delete {run_dir} to train this run from the start" in error
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # nothing of the interrupted run deleted
