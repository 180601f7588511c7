"""The coordinator's judgement of hung stages, and the trace it writes, without stage processes."""
import contextlib
import json
import os
import sys
import time

import pytest
import zmq

from pipeline.config import Config
from workers.coordinator import PAUSE_S, Coordinator
from workers.messages import Record
from workers.trace import is_complete


class LateCollector:
    """A records channel whose wait returns PAUSE_S + 0.5 s late and empty, as when the launcher was stopped inside it
    and the records that queued up meanwhile have not reached the socket yet."""

    def wait(self, timeout_ms: int) -> bool:
        time.sleep(timeout_ms / 1000 + PAUSE_S + 0.5)
        return False


def test_a_pause_of_the_launcher_inside_its_wait_does_not_make_a_stage_hung(tmp_path):
    ctx = zmq.Context()
    coordinator = Coordinator(Config(out=str(tmp_path / "run"), progress=False), 2, 10, ctx, "inproc://report")
    records = coordinator.records
    try:
        coordinator.handle({"stage": 0, "kind": "beat", "step": None})
        coordinator.records = LateCollector()
        coordinator.poll(100)
        assert coordinator.silent_stage(0.5) is None  # silent for 2.6 s, but we were the ones stopped
        time.sleep(1.0)  # shorter than PAUSE_S by a margin a loaded machine's late wake-up cannot use up
        assert coordinator.silent_stage(0.5) == 0  # silent for 1 s after the pause: hung
    finally:
        coordinator.records = records
        coordinator.close()
        ctx.destroy(linger=0)


def test_a_long_wait_that_was_asked_for_is_not_a_pause(tmp_path):
    ctx = zmq.Context()
    coordinator = Coordinator(Config(out=str(tmp_path / "run"), progress=False), 2, 10, ctx, "inproc://report")
    try:
        coordinator.handle({"stage": 1, "kind": "beat", "step": 3})
        coordinator.poll(int(1000 * (PAUSE_S + 0.5)))  # nothing arrives; the wait ran its full length
        assert coordinator.silent_stage(1.0) == 1
    finally:
        coordinator.close()
        ctx.destroy(linger=0)


def test_every_record_kind_has_a_handler_and_an_unknown_kind_is_an_error(tmp_path):
    ctx = zmq.Context()
    coordinator = Coordinator(Config(out=str(tmp_path / "run"), progress=False), 2, 10, ctx, "inproc://report")
    try:
        assert set(coordinator.handlers) == set(Record)
        with pytest.raises(ValueError, match="'bogus' is not a valid Record"):
            coordinator.handle({"stage": 0, "kind": "bogus"})
    finally:
        coordinator.close()
        ctx.destroy(linger=0)


def test_a_failure_names_the_last_step_a_heartbeat_told_not_only_the_last_logged_one(tmp_path):
    ctx = zmq.Context()
    coordinator = Coordinator(Config(out=str(tmp_path / "run"), progress=False), 2, 10, ctx, "inproc://report")
    try:
        coordinator.handle({"stage": 1, "kind": "beat", "step": None})  # before its first step
        assert "stage 2 was killed by signal 9 after step 0;" in str(coordinator.failure(1, "was killed by signal 9"))
        coordinator.handle({"stage": 1, "kind": "beat", "step": 17})
        coordinator.handle({"stage": 1, "kind": "beat", "step": 15})  # a replica behind the one that told 17
        assert "stage 2 was killed by signal 9 after step 17;" in str(coordinator.failure(1, "was killed by signal 9"))
    finally:
        coordinator.close()
        ctx.destroy(linger=0)


def test_a_stage_that_could_not_load_its_checkpoint_is_not_told_to_resume_from_it(tmp_path):
    ctx = zmq.Context()
    coordinator = Coordinator(Config(out=str(tmp_path / "run"), progress=False), 2, 10, ctx, "inproc://report",
                              start_step=4)
    try:
        coordinator.handle({"stage": 1, "kind": "error", "error": "CheckpointError: stage2.pt does not hold ..."})
        failure = str(coordinator.failure(1, "exited with code 1"))
        assert failure.endswith("CheckpointError: stage2.pt does not hold ...") and "--resume" not in failure
        coordinator.handle({"stage": 1, "kind": "error", "error": "DataError: a bad image"})
        assert str(coordinator.failure(1, "exited with code 1")).endswith("kept: resume with --resume " +
                                                                          str(tmp_path / "run"))
    finally:
        coordinator.close()
        ctx.destroy(linger=0)


def test_a_traced_run_that_ends_unfinished_writes_the_spans_that_arrived_marked_incomplete(tmp_path):
    ctx = zmq.Context()
    cfg = Config(out=str(tmp_path / "run"), progress=False, trace=True)
    coordinator = Coordinator(cfg, 2, 10, ctx, "inproc://report")
    trace_file = tmp_path / "run" / "trace.json"
    try:
        coordinator.save_partial_trace()
        assert not trace_file.exists()  # no span arrived: nothing to show, and an older trace is left alone
        coordinator.handle({"stage": 0, "kind": "error", "error": "PeerLost: ...", "trace": [["train", 10, 5, 1]]})
        coordinator.handle({"stage": 1, "kind": "beat", "step": 1})  # records without spans add nothing
        coordinator.save_partial_trace()
        written = json.loads(trace_file.read_text())
        assert not is_complete(written) and [e["tid"] for e in written["traceEvents"] if e["ph"] == "X"] == [0]
        trace_file.unlink()
    finally:
        coordinator.close()  # written once: close() does not write it again
        ctx.destroy(linger=0)
    assert not trace_file.exists()


def test_a_finished_traced_run_is_marked_complete_and_close_leaves_it(tmp_path):
    ctx = zmq.Context()
    cfg = Config(out=str(tmp_path / "run"), progress=False, trace=True, tensorboard=False)
    coordinator = Coordinator(cfg, 1, 10, ctx, "inproc://report")
    record = {"event": "train", "epoch": 0, "step": 2, "module": 1, "loss": 1.0, "acc": 0.5, "lr": 0.1}
    try:
        coordinator.handle({"stage": 0, "kind": "train", "record": record, "busy": 1.0, "idle": 0.0, "queue": 0,
                            "trace": [["train", 10, 5, 1], ["train", 20, 5, 2]]})
        coordinator.handle({"stage": 0, "kind": "done", "busy": 1.0, "idle": 0.0, "peak_memory": 1, "link": None,
                            "trace": [["eval", 30, 5, 2]]})
        coordinator.finish(1.0)
    finally:
        coordinator.close()
        ctx.destroy(linger=0)
    written = json.loads((tmp_path / "run" / "trace.json").read_text())
    assert is_complete(written)
    assert [(e["name"], e["ts"]) for e in written["traceEvents"] if e["ph"] == "X"] == \
        [("train", 10), ("train", 20), ("eval", 30)]  # the train reports' spans, then the done record's, in order


def test_a_progress_bar_whose_terminal_has_gone_does_not_stop_the_close(tmp_path, monkeypatch):
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stderr", stream)  # where the bar draws: a pipe, as under `launch.py 2>&1 | tee log`
    ctx = zmq.Context()
    coordinator = Coordinator(Config(out=str(tmp_path / "run"), progress=True), 2, 10, ctx, "inproc://report")
    try:
        os.close(read_end)  # the reader has gone: the bar's next write is a BrokenPipeError
        coordinator.bar.update(1)
        coordinator.close()  # raised out of here before, leaving the run's files and the socket open
        assert coordinator.records.socket.closed and coordinator.writer.log.file.closed
    finally:
        ctx.destroy(linger=0)
        with contextlib.suppress(OSError):
            stream.close()
