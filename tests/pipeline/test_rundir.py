import json

import pytest
import torch

from pipeline.checkpoint import CheckpointError, checkpoint_dir, complete_checkpoints, save_atomic
from pipeline.config import Config, load_yaml
from pipeline.metrics import read_jsonl
from pipeline.rundir import RunWriter, clear_outputs, written_by_a_run


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


@pytest.mark.parametrize("text", ["model: resnet8\nepochs: 3\n",  # another tool's config: keys we do not know
                                  "model: resnet8\nlr: 0.1\n",  # ours in part, but not what a run writes
                                  "- a list\n", "model: [unclosed\n", b"\xff\xfe"])
def test_fresh_leaves_a_folder_whose_config_yaml_a_run_did_not_write(tmp_path, text):
    (tmp_path / "config.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "model.pt").write_text("someone's model")
    assert not written_by_a_run(tmp_path / "config.yaml")
    with pytest.raises(CheckpointError, match="is not a run's config .* holds checkpoints, model.pt: choose another"):
        clear_outputs(tmp_path)
    assert (tmp_path / "model.pt").read_text() == "someone's model" and (tmp_path / "checkpoints").is_dir()


def test_fresh_clears_what_a_run_left(tmp_path):
    writer = RunWriter(Config(out=str(tmp_path), tensorboard=False), tmp_path)
    writer.record({"event": "train", "step": 1})
    writer.close()
    (tmp_path / "plots").mkdir()
    assert written_by_a_run(tmp_path / "config.yaml")
    clear_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
