import errno
import math
import shutil

import pytest
import torch

from pipeline.checkpoint import RunFileError
from pipeline.metrics import JsonlLog, ModuleMeter, eval_record, read_jsonl, train_records, truncate_after
from pipeline.step import StepStats


class FailingFile:
    """A run's log file on a disk that fails every flush with `error` (a full disk, a read-only one), at close too."""

    def __init__(self, file, error: OSError) -> None:
        self.file, self.error = file, error

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        raise self.error

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()
        self.flush()


def stats(loss: float) -> StepStats:
    return StepStats(loss=torch.tensor(loss), sgr=torch.tensor(0.5), correct=torch.tensor(3), count=4)


def test_meter_averages_and_numbers_modules_from_its_first():
    meter = ModuleMeter(1, first_module=2)  # a pipeline stage holding module 3
    meter.update(0, stats(1.0))
    meter.update(0, stats(3.0))
    (record,) = train_records(meter, epoch=0, step=10, lrs=[0.1])
    assert record == {"event": "train", "module": 3, "epoch": 0, "step": 10, "loss": 2.0, "sgr": 0.5, "acc": 0.75,
                      "lr": 0.1}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_is_refused_naming_the_module(bad):
    meter = ModuleMeter(1, first_module=2)
    meter.update(0, stats(1.0))
    meter.update(0, stats(bad))  # kept on the device: nothing is read back per step
    with pytest.raises(FloatingPointError, match=f"module 3's loss is {bad}"):
        meter.check_finite()
    with pytest.raises(FloatingPointError, match=f"module 3's loss is {bad}"):
        train_records(meter, epoch=0, step=2, lrs=[0.1])


def test_meter_sums_stay_tensors_on_the_steps_device():
    meter = ModuleMeter(2)
    meter.update(1, stats(0.5))
    assert isinstance(meter.loss[1], torch.Tensor) and isinstance(meter.correct[1], torch.Tensor)
    assert meter.loss[0] == 0.0 and meter.check_finite() == [0.0, 0.5]


def test_truncate_after_drops_what_a_dead_run_wrote_after_its_checkpoint(tmp_path):
    log = JsonlLog(tmp_path / "metrics.jsonl")
    for step in (5, 10, 15):
        log.write(eval_record(0, step, [0.5], [0.9], [None]))
    log.close()
    truncate_after(tmp_path / "metrics.jsonl", 10)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [5, 10]


def test_records_are_mirrored_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = JsonlLog(tmp_path / "metrics.jsonl", tensorboard=True)
    meter = ModuleMeter(2)
    meter.update(1, stats(0.25))
    for record in train_records(meter, 0, 7, [0.1, 0.2]):
        log.write(record)
    log.write(eval_record(0, 7, [0.5, 0.75], [0.9, 1.0], [None, -0.125]))
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss/module2")] == [(7, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("test_acc/head2")] == [(7, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("delta_loss/module2")] == [(7, -0.125)]
    assert "delta_loss/module1" not in events.Tags()["scalars"]


def test_a_torn_last_line_is_dropped_with_a_warning_and_the_log_goes_on(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    log = JsonlLog(path)
    for step in (5, 10):
        log.write(eval_record(0, step, [0.5], [0.9], [None]))
    log.close()
    with path.open("a") as f:
        f.write('{"event": "eval", "ste')  # the disk filled mid-write
    truncate_after(path, 10)
    assert capsys.readouterr().err == f"warning: {path}: dropped a torn last line (a write cut short)\n"
    assert [r["step"] for r in read_jsonl(path)] == [5, 10] and path.read_text().endswith("}\n")
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(path)


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    from pipeline.checkpoint import DiskFull

    log = JsonlLog(tmp_path / "metrics.jsonl")
    monkeypatch.setattr(log, "file", FailingFile(log.file, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFull, match=f"disk full writing {tmp_path / 'metrics.jsonl'}: .* MiB free; free some space"):
        log.write(eval_record(0, 5, [0.5], [0.9], [None]))


@pytest.mark.parametrize("how", ["deleted", "moved", "its folder deleted"])
def test_a_log_whose_file_is_gone_stops_the_run_naming_it(tmp_path, how):
    run_dir = tmp_path / "run"
    log = JsonlLog(run_dir / "metrics.jsonl")
    log.write(eval_record(0, 5, [0.5], [0.9], [None]))
    if how == "deleted":
        (run_dir / "metrics.jsonl").unlink()
    elif how == "moved":
        (run_dir / "metrics.jsonl").rename(tmp_path / "elsewhere.jsonl")
        (run_dir / "metrics.jsonl").write_text("")  # a new file under the name is not the run's log either
    else:
        shutil.rmtree(run_dir)
    with pytest.raises(RunFileError) as raised:
        log.write(eval_record(0, 10, [0.5], [0.9], [None]))
    assert raised.value.strerror.startswith(f"cannot write {run_dir / 'metrics.jsonl'}: it was deleted or moved")
    log.close()


def test_a_log_that_cannot_be_written_is_a_run_file_error_and_closes_quietly(tmp_path):
    log = JsonlLog(tmp_path / "metrics.jsonl")
    log.file = FailingFile(log.file, PermissionError(errno.EPERM, "Operation not permitted"))  # chattr +i, say
    with pytest.raises(RunFileError) as raised:
        log.write(eval_record(0, 5, [0.5], [0.9], [None]))
    assert raised.value.strerror == f"cannot write {tmp_path / 'metrics.jsonl'}: Operation not permitted"
    log.close()  # its buffered line fails again: said already, not a second traceback
