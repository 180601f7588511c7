"""A stage process's own exit paths (the pipeline's lifecycle is in test_pipeline.py)."""
import multiprocessing as mp
import os
import signal

import torch

from workers.stage import _end_on_sigterm
from workers.transport import SharedMemoryPayload, named_segments


def _hold_a_slot_until_terminated(ready) -> None:
    signal.signal(signal.SIGTERM, _end_on_sigterm)
    payload = SharedMemoryPayload()
    payload.pack(0, {"x": torch.ones(1000)})  # a slot no consumer has mapped yet: its name is still in /dev/shm
    ready.set()
    signal.pause()


def test_sigterm_unlinks_the_stages_shared_memory_and_still_ends_the_process_by_the_signal():
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_a_slot_until_terminated, args=(ready,))
    child.start()
    try:
        assert ready.wait(60)
        assert named_segments(child.pid)
        os.kill(child.pid, signal.SIGTERM)
        child.join(10)
        assert child.exitcode == -signal.SIGTERM  # the launcher still reads "killed by signal 15"
        assert not named_segments(child.pid)
    finally:
        if child.is_alive():
            child.kill()
