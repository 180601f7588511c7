"""The coordinator's judgement of hung stages, without stage processes."""
import time

import pytest
import zmq

from pipeline.config import Config
from workers.coordinator import PAUSE_S, Coordinator
from workers.messages import Record


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
