"""The study runner: a tiny study runs every arm × seed, writes the table and plots, and skips finished runs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

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


def run(study: Path, out: Path) -> str:
    done = subprocess.run([sys.executable, "experiments/study.py", str(study), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


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
