"""The study runner: a tiny study runs every arm × seed, writes the table and plots, skips finished runs and resumes
an interrupted one."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def killed_after_step_20(tmp_path: Path) -> tuple[Path, Path, Path, dict]:
    """ONE_RUN trained to its end, then left as a kill after step 20 leaves it: no summary, and no checkpoint past 20
    (its records are cut back on resume). The study file, its out folder, the run's folder and its finished summary."""
    study, out = tmp_path / "one.yaml", tmp_path / "out"
    study.write_text(ONE_RUN)
    run(study, out)
    run_dir = out / "sgr" / "seed0"
    finished = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").unlink()
    for later in [c for c in (run_dir / "checkpoints").iterdir() if int(c.name.removeprefix("step")) > 20]:
        shutil.rmtree(later)
    return study, out, run_dir, finished


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path):
    study, out, run_dir, finished = killed_after_step_20(tmp_path)
    records = (run_dir / "metrics.jsonl").read_text()
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


def test_a_corrupted_checkpoint_skipped_on_resume_is_one_warning_line(tmp_path):
    study, out, run_dir, finished = killed_after_step_20(tmp_path)  # and then step 20's checkpoint rotted
    rotten = sorted((run_dir / "checkpoints" / "step00000020").glob("stage*.pt"))[0]
    data = bytearray(rotten.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rotten.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "experiments/study.py", str(study), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"warning: skipping checkpoint {rotten.parent}: {rotten.name} does not match its SHA-256" in done.stderr
    assert "UserWarning" not in done.stderr and "warnings.warn" not in done.stderr
    assert f"resuming {run_dir} from step 10" in done.stdout
    assert json.loads((run_dir / "summary.json").read_text())["final_test_acc"] == finished["final_test_acc"]


def test_a_changed_arm_a_damaged_summary_and_a_run_in_use_are_one_line_and_train_nothing(tmp_path):
    study, out = tmp_path / "one.yaml", tmp_path / "out"
    study.write_text(ONE_RUN)
    run(study, tmp_path / "first")
    (tmp_path / "first").rename(out)  # a study folder moved: its runs' config.yaml name the old `out`
    assert "done before, skipped" in run(study, out)
    run_dir = out / "sgr" / "seed0"
    summary = (run_dir / "summary.json").read_text()
    study.write_text(ONE_RUN.replace("lam: 1.0", "lam: 100.0"))  # its table row would show lam=100 for a lam=1 run
    error = run(study, out, expect=2)
    assert error == (f"error: arm sgr, seed 0: {run_dir} was trained with lam=1.0 (now 100.0); restore the arm's "
                     f"settings, or delete {run_dir} to train it with the new ones\n")
    study.write_text(ONE_RUN)
    for damaged in ("{", "{}", "[]"):
        (run_dir / "summary.json").write_text(damaged)
        error = run(study, out, expect=2)
        assert error.startswith(f"error: {run_dir / 'summary.json'} cannot be read (") and len(error.splitlines()) == 1
        assert error.endswith(f"); delete {run_dir} to train that run again\n")
    (run_dir / "summary.json").unlink()  # interrupted after its last checkpoint, in use by another study
    held = lock_run_dir(run_dir)
    try:
        assert f"{run_dir} is in use by another run" in run(study, out, expect=2)
    finally:
        held.close()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # nothing of the run deleted
    (run_dir / "summary.json").write_text(summary)
    assert "done before, skipped" in run(study, out)


@pytest.mark.parametrize("text,message", [
    (None, "study file {path} not found; pick one from experiments/ (e.g. experiments/table3.yaml)"),
    ("arms: [", "study file {path} is not valid YAML: "),
    ("- 1\n- 2\n", "study file {path} must be a mapping of key: value"),
    ("arms: {a: [1, 2]}\n", "{path}: arm 'a' must map config keys to values (or be empty), got [1, 2]"),
    ("arms: {a: {lam: 1}}\nbase: [1, 2]\n", "{path}: `base` must be a config file's path or a mapping"),
    ("arms: {a: {lam: 1}}\nout: 5\n", "{path}: `out` must be a folder path, got 5"),
    ("arms: {a: {lam: 1}}\nseeds: []\n", "{path}: `seeds` must be a list of distinct integers, e.g. [0, 1, 2], got []"),
    ("arms: {a: {lam: 1}}\nseeds: [1, 1]\n", "{path}: `seeds` must be a list of distinct integers"),
    ("arms: {a: {lam: x}}\n", "arm a, seed 0: "),
])
def test_a_malformed_study_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    done = subprocess.run([sys.executable, "experiments/study.py", str(path), "--out", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: " + message.format(path=path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGHUP, 129, "hung up")])
def test_ctrl_c_sigterm_or_sighup_stops_a_study_in_one_line(tmp_path, sig, code, word):
    study = tmp_path / "long.yaml"
    study.write_text(ONE_RUN.replace("epochs: 2", "epochs: 50"))
    proc = subprocess.Popen([sys.executable, "experiments/study.py", str(study), "--out", str(tmp_path / "out")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "training ->" in proc.stdout.readline()
        time.sleep(3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert err == (f"{word}: run the study again to continue (finished runs are skipped, the interrupted one resumes "
                   "from its newest checkpoint)\n")
