"""A stage process's own set-up and exit paths (the pipeline's lifecycle is in test_pipeline.py)."""
import contextlib
import multiprocessing as mp
import os
import signal
from typing import Callable, Iterator

import torch
import zmq

import workers.stage
from pipeline.config import Config, validate
from pipeline.data import data_shape, load_config_data
from pipeline.stages import build_local_modules
from workers.stage import StageSpec, StageWorker, _end_on_sigterm
from workers.transport import SharedMemoryPayload, named_segments

SPAWN = mp.get_context("spawn")


@contextlib.contextmanager
def spawned(target: Callable[..., None], *args: object) -> Iterator[mp.Process]:
    """A child process running target(*args), killed at the end if it is still alive."""
    child = SPAWN.Process(target=target, args=args)
    child.start()
    try:
        yield child
    finally:
        if child.is_alive():
            child.kill()


def _hold_a_slot_until_terminated(ready) -> None:
    signal.signal(signal.SIGTERM, _end_on_sigterm)
    payload = SharedMemoryPayload()
    payload.pack(0, {"x": torch.ones(1000)})  # a slot no consumer has mapped yet: its name is still in /dev/shm
    ready.set()
    signal.pause()


def test_sigterm_unlinks_the_stages_shared_memory_and_still_ends_the_process_by_the_signal():
    ready = SPAWN.Event()
    with spawned(_hold_a_slot_until_terminated, ready) as child:
        assert ready.wait(60)
        assert named_segments(child.pid)
        os.kill(child.pid, signal.SIGTERM)
        child.join(10)
        assert child.exitcode == -signal.SIGTERM  # the launcher still reads "killed by signal 15"
        assert not named_segments(child.pid)


def _stage_one_data(results) -> None:
    """Build stage 1 of a digits run twice, with launch.py's data (a torchrun rank) and without; count the loads."""
    torch.set_num_threads(1)
    cfg = validate(Config(dataset="digits", model="resnet8", batch_size=32, epochs=1, progress=False))
    data = load_config_data(cfg)
    stages = len(build_local_modules(cfg, data.in_channels, data.num_classes, data.input_size))
    spec = StageSpec(0, stages, cfg.to_dict(), [], [], None, "cpu", 1, data_shape(data, cfg.batch_size))
    loads = []
    workers.stage.load_config_data = lambda c: loads.append(c) or load_config_data(c)
    ctx = zmq.Context()
    for given in (data, None):
        worker = StageWorker(spec, ctx, None, given)
        results.put((worker.data is data, len(loads)))
        worker.close()
    ctx.term()


def test_stage_one_draws_from_the_data_its_process_loaded_already_and_loads_it_otherwise():
    results = SPAWN.Queue()
    with spawned(_stage_one_data, results) as child:
        assert results.get(timeout=120) == (True, 0)  # a torchrun rank of stage 1: launch.py's data, no second load
        assert results.get(timeout=120) == (False, 1)  # a spawned stage 1: it loads its own
        child.join(30)
        assert child.exitcode == 0
