"""The run's loop, in one place: which training batches come in which epoch, and what is due after each.

The sequential trainer and the pipeline's first stage both walk this sequence, so they train on
the same batches and evaluate and checkpoint after the same steps by construction; a resumed run
starts at the first batch not yet trained. A background thread draws each epoch's next batch while
the current one trains, so the trainer (or stage 1, the pipeline's feeder) does not wait for it.
"""
from __future__ import annotations

import atexit
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, TypeVar

import torch

from pipeline.config import Config, infopro_losses, views_per_image
from pipeline.data import Data, Part, pixels, stats_on, train_batches
from pipeline.views import PHOTOMETRIC

T = TypeVar("T")
_END = object()  # the producer's last queue entry
_DRAWING: dict[threading.Thread, threading.Event] = {}  # prefetch threads alive, and what stops each


@atexit.register
def _stop_drawing() -> None:
    """At exit, stop every prefetch thread and wait for it: Python ends a daemon thread that is inside a torch call
    by aborting the process ("terminate called without an active exception", exit 134)."""
    for stop in list(_DRAWING.values()):
        stop.set()
    for thread in list(_DRAWING):
        thread.join(timeout=10)


@dataclass(frozen=True)
class ScheduledStep:
    """One training batch of the run and what follows it."""

    epoch: int
    step: int  # 1-based, counted over the whole run
    x: torch.Tensor  # on the device, normalised
    y: torch.Tensor  # labels, on the CPU
    evaluate: bool  # an evaluation is due after this step
    checkpoint: bool  # a checkpoint is due after this step
    image: torch.Tensor | None = None  # InfoPro's losses: the uint8 images of x, on its device


def is_due(every: int, step: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether an every-N-steps event (evaluation, checkpoint) happens after `step`; 0 means each epoch's end."""
    if step == total_steps:
        return True
    return step % (every or steps_per_epoch) == 0


def run_epochs(cfg: Config, data: Data, steps_per_epoch: int, start_step: int = 0, device: torch.device | None = None,
               part: Part = None) -> Iterator[tuple[int, int, Iterator[ScheduledStep]]]:
    """Per epoch from the one holding step `start_step` + 1: (epoch, batches of it already trained, its steps); with
    `part`, each step's images are only that part's rows (data.train_batches). Walk each epoch's steps to the end
    before asking for the next epoch: one thread draws them all, one ahead, across epochs (the next epoch's first batch
    is drawn during this one's evaluation)."""
    total = steps_per_epoch * cfg.epochs
    first = start_step // steps_per_epoch
    skips = {epoch: max(0, start_step - epoch * steps_per_epoch) for epoch in range(first, cfg.epochs)}  # resumed runs
    drawn = prefetched(_all_steps(cfg, data, skips, steps_per_epoch, total, device, part), device=device)
    for epoch, skip in skips.items():  # the thread stops when `drawn` is dropped: with this loop and its last epoch
        yield epoch, skip, _epoch_of(drawn, epoch, steps_per_epoch - skip)


def _all_steps(cfg: Config, data: Data, skips: dict[int, int], steps_per_epoch: int, total: int,
               device: torch.device | None, part: Part) -> Iterator[ScheduledStep]:
    """Every epoch's steps, one stream (a generator: closing it closes the epoch's loader)."""
    for epoch, skip in skips.items():
        yield from _steps(cfg, data, epoch, skip, steps_per_epoch, total, device, part)


def _epoch_of(drawn: Iterator[ScheduledStep], epoch: int, count: int) -> Iterator[ScheduledStep]:
    """The next `count` steps of the run's stream, which must be `epoch`'s."""
    for _ in range(count):
        s = next(drawn)
        if s.epoch != epoch:
            raise RuntimeError(f"step {s.step} of epoch {s.epoch} came while epoch {epoch} was walked: a caller "
                               "stopped walking an epoch's steps before its end")
        yield s


def prefetched(items: Iterator[T], ahead: int = 1, device: torch.device | None = None) -> Iterator[T]:
    """`items` in order, at most `ahead` of them drawn and not yet handed over, by a background thread; its exception
    is raised here, in turn.

    Drawing a batch on the host (gather, augment, pin) overlaps the step that trains the previous one (the trace of
    stage 1 showed it as ~1 ms between steps, sleeping stages at 20 ms). Closing this generator early stops the
    thread. Batches on a GPU: the thread makes `device` its current one (a new thread's is GPU 0, whose context a
    stage on another GPU must not create) and queues the copy and normalisation on its default stream, which the
    training shares, so they are ordered before the step that reads the batch (they do not overlap it on the GPU).
    """
    ready: queue.Queue = queue.Queue()
    room = threading.Semaphore(ahead)  # a draw takes one, the consumer's taking the item gives it back
    stop = threading.Event()
    if device is not None and device.type == "cuda" and device.index is None:  # plain `cuda`: this thread's current
        device = torch.device("cuda", torch.cuda.current_device())

    def produce() -> None:
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            source = iter(items)
            while True:
                while not room.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                item = next(source, _END)
                ready.put((item, None))
                if item is _END:
                    return
        except BaseException as err:  # handed to the consumer, which raises it in turn
            ready.put((_END, err))
        finally:
            try:
                close = getattr(items, "close", None)
                if close is not None:  # a generator: its loader (DataLoader workers) ends now, not at collection
                    close()
            finally:  # only now: the exit hook waits for a thread until it has closed its source
                _DRAWING.pop(threading.current_thread(), None)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    _DRAWING[thread] = stop
    thread.start()
    try:
        while True:
            item, err = ready.get()
            room.release()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()


def config_batches(cfg: Config, data: Data, epoch: int, skip: int = 0, device: torch.device | None = None,
                   part: Part = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's training batches as the config draws them (augmentation, views and their recipes)."""
    return train_batches(data, epoch, cfg.batch_size, cfg.seed, cfg.augment, skip, device, part, views_per_image(cfg),
                         PHOTOMETRIC[cfg.photometric])


def _steps(cfg: Config, data: Data, epoch: int, skip: int, steps_per_epoch: int, total: int,
           device: torch.device | None, part: Part) -> Iterator[ScheduledStep]:
    batches = config_batches(cfg, data, epoch, skip, device, part)
    for i, (x, y) in enumerate(batches, start=skip):
        step = epoch * steps_per_epoch + i + 1
        yield ScheduledStep(epoch, step, x, y, is_due(cfg.eval_every, step, steps_per_epoch, total),
                            is_due(cfg.checkpoint_every, step, steps_per_epoch, total),
                            pixels(x, *stats_on(data, x.device)) if infopro_losses(cfg) else None)
