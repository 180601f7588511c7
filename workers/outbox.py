"""A stage's outgoing messages, sent by a thread of its own so that sending overlaps the stage's next step.

On a CPU stage, copying a message into its links (for a shared-memory link, ~0.35 ms for the 3 MB of a
ResNet-32 stage's output and δ at batch 128) and waiting for the links' credit happen in the outbox's
thread while the stage trains on the next batch, as the schedules of torch.distributed.pipelining post
an isend and go on. The thread owns the senders (a zmq socket belongs to one thread), and messages
leave in the order they were handed over, so the consumers see exactly what they saw before. One
message at most is handed over and not yet sent: a stage holds at most depth + 1 unfinished messages.
What a stage hands over must not change afterwards: the steps' outputs are tensors of their own, and a
view of a received slot is copied first (`borrowed`). A GPU stage sends inline (placement.sends_in_background).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch

from workers.trace import OUTBOX_SPANS, Tracer, now
from workers.transport import WAKE_MS, Sender

Parcel = tuple[Sender, dict[str, Any], dict[str, torch.Tensor | None]]  # a link, the header and that link's tensors
_FINISH = object()  # the thread's last entry: send the rest, then wait for every credit
STOP_WAIT_S = 2.0  # how long `close` waits for the thread to give up


class Outbox:
    """Sends each handed-over message to its links, in order: from a background thread, or inline."""

    def __init__(self, senders: list[Sender], background: bool,
                 borrowed: Callable[[torch.Tensor], bool] = lambda t: False, trace: Tracer | None = None) -> None:
        """`borrowed(t)`: whether t is memory another stage may overwrite once this one returns its credit (a view of
        a received shared-memory slot); such a tensor is copied before it is handed to the thread. `trace`: the
        stage's, where the thread records its waits for credit and its sends (trace.OUTBOX_SPANS)."""
        self.senders, self.borrowed, self.trace = senders, borrowed, trace or Tracer(False)
        self.waiting: queue.Queue = queue.Queue()
        self.handed = self.sent = 0  # messages handed over (by the stage's thread) and sent (by the outbox's)
        self.changed = threading.Condition()  # notified when a message has been sent, and when the thread ends
        self.stopping, self.ended = threading.Event(), threading.Event()
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
        waited = 0.0
        with self.changed:  # until the previous message has been sent; at once if the thread failed (a lost peer)
            if not self._room():
                start = now()
                self.changed.wait_for(self._room)
                waited = now() - start
            self._raise()
            if self.ended.is_set():
                raise RuntimeError("a message was handed to an outbox that has finished or closed")
            self.handed += 1
        self.waiting.put((parcels, training))
        return waited

    def _room(self) -> bool:
        """Whether a message may be handed over now (or the thread has ended, which the hand-over then raises)."""
        return self.sent == self.handed or self.ended.is_set()

    def _own(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """`t`, or a copy of it where the credit this stage returns next would let its producer overwrite it."""
        return t.clone() if t is not None and self.borrowed(t) else t

    def pending(self) -> int:
        """Messages handed over and not yet finished downstream, per link (not yet sent, or sent and not yet
        credited); for a moment, a message just sent is counted twice."""
        return (self.handed - self.sent) * len(self.senders) + sum(len(sender.in_flight) for sender in self.senders)

    def finish(self) -> None:
        """Send everything handed over, then wait until the consumers have finished it all (their credits)."""
        if self.thread is None:
            for sender in self.senders:
                sender.drain()
            return
        self.waiting.put(_FINISH)
        self.ended.wait()  # an Event, not join(): a Ctrl-C here leaves the thread's state as it is, for `close`
        self._raise()

    def close(self) -> None:
        """Stop the thread (a run that fails drops what was not sent yet), then close the links.

        A thread waiting for credit or for its consumer to start gives up within WAKE_MS (Sender.abandon); should
        it not end in time, its links are left to the ending process rather than closed under it."""
        if self.thread is not None:
            self.stopping.set()
            for sender in self.senders:
                sender.abandon()
            if not self.ended.wait(STOP_WAIT_S):
                return
        for sender in self.senders:
            sender.close()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    item = self.waiting.get(timeout=WAKE_MS / 1000)
                except queue.Empty:
                    continue
                if item is _FINISH:
                    for sender in self.senders:
                        sender.drain()
                    return
                parcels, training = item
                for sender, header, tensors in parcels:
                    if self.stopping.is_set():
                        return
                    start = now()
                    waited = sender.send(header, tensors, training)
                    self.trace.add_send(start, waited, now(), header.get("step"), OUTBOX_SPANS)
                with self.changed:
                    self.sent += 1
                    self.changed.notify_all()
        except BaseException as err:  # raised in the stage's own thread at its next send, or by `finish`
            self.error = err
        finally:
            with self.changed:
                self.ended.set()
                self.changed.notify_all()
