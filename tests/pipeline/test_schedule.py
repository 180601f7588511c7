import itertools
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import Config
from pipeline.data import load_config_data, steps_per_epoch, train_batches
from pipeline.schedule import is_due, prefetched, run_epochs

ROOT = Path(__file__).resolve().parents[2]


def test_a_run_walks_its_epochs_batches_and_due_events_from_any_start():
    cfg = Config(dataset="digits", batch_size=64, epochs=3, train_subset=256, eval_every=0, checkpoint_every=3)
    data = load_config_data(cfg)
    spe = steps_per_epoch(data, cfg.batch_size)
    assert spe == 4
    walked = [(epoch, trained, [(s.step, s.evaluate, s.checkpoint) for s in steps])
              for epoch, trained, steps in run_epochs(cfg, data, spe)]
    assert walked == [(0, 0, [(1, False, False), (2, False, False), (3, False, True), (4, True, False)]),
                      (1, 0, [(5, False, False), (6, False, True), (7, False, False), (8, True, False)]),
                      (2, 0, [(9, False, True), (10, False, False), (11, False, False), (12, True, True)])]
    resumed = [(epoch, trained, [s.step for s in steps]) for epoch, trained, steps in run_epochs(cfg, data, spe, 6)]
    assert resumed == [(1, 2, [7, 8]), (2, 0, [9, 10, 11, 12])]  # the first batch not yet trained
    first = next(next(run_epochs(cfg, data, spe, 6))[2])  # an epoch's steps outlive the loop that gave them
    x, y = list(train_batches(data, 1, cfg.batch_size, cfg.seed, cfg.augment))[2]
    assert first.epoch == 1 and torch.equal(first.x, x) and torch.equal(first.y, y)  # the batches of (seed, epoch)


def test_an_epoch_left_before_its_end_is_refused_not_mixed_into_the_next():
    cfg = Config(dataset="digits", batch_size=64, epochs=2, train_subset=256)
    data = load_config_data(cfg)
    run = run_epochs(cfg, data, steps_per_epoch(data, cfg.batch_size))
    _, _, steps = next(run)
    next(steps)  # three of epoch 0's four batches left unwalked
    _, _, steps = next(run)
    with pytest.raises(RuntimeError, match="before its end"):
        next(steps)


def test_the_last_step_is_always_due():
    assert is_due(1000, 12, 4, 12) and not is_due(1000, 11, 4, 12) and is_due(0, 8, 4, 12)


def counting(n: int, drawn: list[int], fail_at: int | None = None, closed: threading.Event | None = None):
    """0..n-1 (forever with n < 0), noting each draw; raises ValueError at `fail_at`; sets `closed` at its end."""
    try:
        for i in itertools.count() if n < 0 else range(n):
            if i == fail_at:
                raise ValueError(f"item {i} is broken")
            drawn.append(i)
            yield i
    finally:
        if closed is not None:
            closed.set()


def wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_prefetched_keeps_order_and_draws_one_item_ahead_not_more():
    drawn: list[int] = []
    items = prefetched(counting(10, drawn), ahead=1)
    assert next(items) == 0
    assert wait_for(lambda: len(drawn) >= 2)  # the next item was drawn while the consumer held the first
    time.sleep(0.2)
    assert len(drawn) == 2  # the one handed over and one ahead, no more (on a GPU: one extra batch in memory)
    assert list(items) == list(range(1, 10))


def test_prefetched_raises_the_producers_error_in_turn():
    items = prefetched(counting(5, [], fail_at=2))
    assert next(items) == 0 and next(items) == 1
    with pytest.raises(ValueError, match="item 2 is broken"):
        next(items)


def test_closing_prefetched_early_stops_its_thread_and_closes_the_source():
    closed = threading.Event()
    items = prefetched(counting(-1, [], closed=closed))
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert closed.wait(5)  # the producer saw the stop and closed its (endless) source


def test_the_prefetch_thread_draws_gpu_batches_with_the_stages_gpu_current(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: made_current.append((device, threading.current_thread().name)))
    assert list(prefetched(iter(range(3)), device=torch.device("cuda", 1))) == [0, 1, 2]
    assert made_current == [(torch.device("cuda", 1), "prefetch")]  # before the first draw, in the drawing thread
    made_current.clear()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # plain `cuda` (--device cuda): the caller's GPU
    assert list(prefetched(iter(range(3)), device=torch.device("cuda"))) == [0, 1, 2]
    assert made_current == [(torch.device("cuda", 3), "prefetch")]
    made_current.clear()
    assert list(prefetched(iter(range(3)), device=torch.device("cpu"))) == [0, 1, 2] and not made_current


def test_a_process_that_exits_while_its_prefetch_thread_computes_exits_cleanly():
    # the consumer is still referenced at exit (as a traceback holds it), its thread busy in torch matmuls: without
    # the exit hook, Python cuts the thread off inside a torch call and the process aborts (exit 134)
    code = textwrap.dedent("""
        import torch
        from pipeline.schedule import prefetched
        def products():
            while True:
                x = torch.randn(1000, 1000)
                yield x @ x
        KEPT = prefetched(products())
        next(KEPT)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
