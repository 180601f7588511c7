import json

import torch

from pipeline.checkpoint import checkpoint_dir, complete_checkpoints, save_atomic
from pipeline.config import Config, load_yaml
from pipeline.metrics import read_jsonl
from pipeline.rundir import RunWriter


def test_the_run_writer_writes_config_metrics_checkpoints_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"event": "train", "step": 4}\n{"event": "train", "step": 9}\n')
    writer = RunWriter(Config(out=str(run_dir), keep_checkpoints=1, tensorboard=False), run_dir, start_step=5)  # resumed at step 5
    writer.record({"event": "train", "step": 6})
    for step in (6, 8):
        save_atomic({"w": torch.ones(2)}, checkpoint_dir(run_dir, step) / "stage1.pt")
        writer.seal(step, 0, {"model": "m", "stages": 1}, 1, None)
    writer.summary({"final_test_acc": 0.5})
    writer.close()
    assert load_yaml(run_dir / "config.yaml").keep_checkpoints == 1
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [4, 6]  # the dead run's step 9 is gone
    assert [c.step for c in complete_checkpoints(run_dir)] == [8]  # sealed, and pruned to keep_checkpoints
    assert json.loads((run_dir / "summary.json").read_text()) == {"final_test_acc": 0.5}
