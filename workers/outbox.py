"""A stage's outgoing messages, sent by a thread of its own so that sending overlaps the stage's next step.

On a CPU stage, copying a message into its links (for a shared-memory link, ~0.35 ms for the 3 MB of a
ResNet-32 stage's output and δ at batch 128) and waiting for the links' credit happen in the outbox's
thread while the stage trains on the next batch, as the schedules of torch.distributed.pipelining post
an isend and go on. The thread owns the senders (a zmq socket belongs to one thread), and messages
leave in the order they were handed over, so the consumers see exactly what they saw before. At most
one message waits in the outbox: a stage holds at most depth + 1 unfinished messages per window.
A GPU stage sends inline (placement.sends_in_background).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import torch

from workers.transport import Sender

Parcel = tuple[Sender, dict[str, Any], dict[str, torch.Tensor | None]]  # a link, the header and that link's tensors
_FINISH, _STOP = object(), object()  # the thread's last entries: send the rest and drain, or give up
PUT_WAKE_S = 0.1  # how often a stage waiting for room checks whether the thread failed
STOP_WAIT_S = 2.0  # how long `close` waits for the thread to give up


class Outbox:
    """Sends each handed-over message to its links, in order: from a background thread, or inline."""

    def __init__(self, senders: list[Sender], background: bool,
                 borrowed: Callable[[torch.Tensor], bool] = lambda t: False) -> None:
        """`borrowed(t)`: whether t is memory another stage may overwrite once this one returns its credit (a view of
        a received shared-memory slot); such a tensor is copied before it is handed to the thread."""
        self.senders, self.borrowed = senders, borrowed
        self.waiting: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        if background and senders:
            self.thread = threading.Thread(target=self._run, name="outbox", daemon=True)
            self.thread.start()

    def send(self, parcels: list[Parcel], training: bool) -> float:
        """Hand one message over (a parcel per link); the seconds spent waiting for room (for the stage's trace).

        Raises what made an earlier message fail (PeerLost: a consumer died or hung)."""
        if self.thread is None:
            return sum(sender.send(header, tensors, training) for sender, header, tensors in parcels)
        parcels = [(sender, header, {name: self._own(t) for name, t in tensors.items()})
                   for sender, header, tensors in parcels]
        start = time.perf_counter()
        self._put((parcels, training))
        return time.perf_counter() - start

    def _own(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """`t`, or a copy of it where the credit this stage returns next would let its producer overwrite it."""
        return t.clone() if t is not None and self.borrowed(t) else t

    def pending(self) -> int:
        """Messages handed over and not yet finished downstream (waiting here, or sent and not yet credited)."""
        return self.waiting.qsize() + sum(len(sender.in_flight) for sender in self.senders)

    def finish(self) -> None:
        """Send everything handed over, then wait until the consumers have finished it all (their credits)."""
        if self.thread is None:
            for sender in self.senders:
                sender.drain()
            return
        self._put(_FINISH)
        self.thread.join()
        self._raise()

    def close(self) -> None:
        """Stop the thread (a run that fails drops what was not sent yet), then close the links.

        A thread waiting for credit gives up within a tenth of a second (Sender.abandon); should it not end in time
        (stuck connecting to a consumer that never started), its links are left to the ending process."""
        if self.thread is not None and self.thread.is_alive():
            for sender in self.senders:
                sender.abandon()
            try:
                self.waiting.put_nowait(_STOP)
            except queue.Full:  # the thread is sending, and gives up when it next waits
                pass
            self.thread.join(timeout=STOP_WAIT_S)
            if self.thread.is_alive():
                return
        for sender in self.senders:
            sender.close()

    def _put(self, item: Any) -> None:
        while True:
            self._raise()
            try:
                self.waiting.put(item, timeout=PUT_WAKE_S)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while True:
                item = self.waiting.get()
                if item is _STOP:
                    return
                if item is _FINISH:
                    for sender in self.senders:
                        sender.drain()
                    return
                parcels, training = item
                for sender, header, tensors in parcels:
                    sender.send(header, tensors, training)
        except BaseException as err:  # raised in the stage's own thread at its next send
            self.error = err
