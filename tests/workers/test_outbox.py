import os
import signal
import threading
import time

import pytest
import torch
import zmq

from workers.outbox import Outbox
from workers.placement import LinkKind
from workers.transport import LinkAbandoned, PeerLost, Receiver, Sender, named_segments


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


def shm_link(ctx: zmq.Context, path, depth: int = 2, timeout_s: float = 5) -> tuple[Sender, Receiver]:
    receiver = Receiver(ctx, f"unix://{path}", timeout_s=timeout_s)
    return Sender(ctx, f"unix://{path}", LinkKind.SHARED_MEMORY, depth=depth, timeout_s=timeout_s), receiver


@pytest.mark.parametrize("background", [True, False])
def test_messages_leave_in_order_and_finish_waits_for_every_credit(ctx, tmp_path, background):
    sender, receiver = shm_link(ctx, tmp_path / "out")
    outbox = Outbox([sender], background)
    assert (outbox.thread is not None) == background
    got = []

    def consume():
        for _ in range(6):
            message = receiver.recv()
            got.append((message.header["n"], message.tensors["x"].clone()))
            receiver.done(message)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for n in range(6):
        outbox.send([(sender, {"n": n}, {"x": torch.full((1000,), float(n)), "none": None})], training=n % 2 == 0)
    outbox.finish()
    consumer.join(timeout=5)
    assert [n for n, _ in got] == list(range(6))
    assert all(torch.equal(x, torch.full((1000,), float(n))) for n, x in got)
    assert outbox.pending() == 0 and not named_segments(os.getpid())  # every credit back, every slot's name gone
    outbox.close()
    receiver.close()


def test_a_view_of_a_received_slot_is_copied_before_its_credit_lets_the_producer_overwrite_it(ctx, tmp_path):
    upstream, inbox = shm_link(ctx, tmp_path / "in", depth=1)  # depth 1: the next message reuses the one slot
    sender, downstream = shm_link(ctx, tmp_path / "out", depth=1)
    outbox = Outbox([sender], background=True, borrowed=inbox.holds)
    try:
        upstream.send({"n": 0}, {"x": torch.zeros(1000)})
        message = inbox.recv()
        x = message.tensors["x"]
        assert inbox.holds(x) and not inbox.holds(x.clone()) and not inbox.holds(torch.zeros(0))
        outbox.send([(sender, {"n": "first"}, {"x": torch.ones(3)})], training=True)
        outbox.send([(sender, {"n": "forwarded"}, {"x": x})], training=True)  # waits in the thread for a credit
        inbox.done(message)
        upstream.send({"n": 1}, {"x": torch.full((1000,), 7.0)})  # reuses the slot x was a view of
        assert torch.equal(x, torch.full((1000,), 7.0))
        downstream.done(downstream.recv())  # now the thread sends the forwarded message
        forwarded = downstream.recv()
        assert forwarded.header["n"] == "forwarded" and torch.equal(forwarded.tensors["x"], torch.zeros(1000))
        downstream.done(forwarded)
        inbox.done(inbox.recv())
        upstream.drain()
        outbox.finish()
    finally:
        for end in (outbox, upstream, inbox, downstream):
            end.close()
    assert not named_segments(os.getpid())


def test_a_consumer_that_has_gone_is_raised_at_the_stages_next_send(ctx, tmp_path):
    sender, receiver = shm_link(ctx, tmp_path / "out", timeout_s=2)
    outbox = Outbox([sender], background=True)
    outbox.send([(sender, {"n": 0}, {"x": torch.ones(3)})], training=True)
    receiver.done(receiver.recv())
    receiver.close()  # the next stage dies
    with pytest.raises(PeerLost, match="has gone|cannot send"):
        for n in range(1, 20):
            outbox.send([(sender, {"n": n}, {"x": torch.ones(3)})], training=True)
            time.sleep(0.05)
    outbox.close()


def test_close_stops_a_thread_that_waits_for_credit(ctx, tmp_path):
    sender, receiver = shm_link(ctx, tmp_path / "out", depth=1, timeout_s=60)
    outbox = Outbox([sender], background=True)
    for n in range(2):  # the second waits for the first's credit, which never comes
        outbox.send([(sender, {"n": n}, {"x": torch.ones(3)})], training=True)
    time.sleep(0.2)
    assert outbox.thread.is_alive()
    outbox.close()
    assert outbox.ended.is_set()  # the thread gave up waiting for credit: close did not wait STOP_WAIT_S for nothing
    receiver.close()
    assert not named_segments(os.getpid())


class FakeSender:
    """Stands in for a Sender: `send` waits for `go` (a long copy or credit), `drain` for credits that never come;
    both give up once abandoned. Records whether it was closed while still in use by the outbox's thread."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.in_flight: dict[int, bool] = {}
        self.sent: list[int] = []
        self.go, self.abandoned = threading.Event(), threading.Event()
        self.go.set()
        self.fail_at, self.busy, self.closed, self.closed_while_busy = fail_at, False, False, False

    def send(self, header, tensors, training=True) -> float:
        self.busy = True
        try:
            while not self.go.wait(0.01):
                if self.abandoned.is_set():
                    raise LinkAbandoned("gave up")
            if header["n"] == self.fail_at:
                raise PeerLost("stage 2 has gone: it closed its end of the link")
            self.sent.append(header["n"])
            self.in_flight[header["n"]] = training
            return 0.0
        finally:
            self.busy = False

    def drain(self) -> None:
        self.busy = True
        try:
            while not self.abandoned.wait(0.01):
                pass
            raise LinkAbandoned("gave up")
        finally:
            self.busy = False

    def abandon(self) -> None:
        self.abandoned.set()

    def close(self) -> None:
        self.closed, self.closed_while_busy = True, self.busy


def hand(outbox: Outbox, sender: FakeSender, n: int) -> float:
    return outbox.send([(sender, {"n": n}, {"x": torch.ones(1)})], training=True)


def test_close_stops_the_thread_with_a_message_still_waiting_and_only_then_closes_the_links():
    sender = FakeSender()
    sender.go.clear()  # the first message's send takes long: the second waits to be handed over
    outbox = Outbox([sender], background=True)
    hand(outbox, sender, 0)
    handing = threading.Thread(target=hand, args=(outbox, sender, 1))
    handing.start()
    time.sleep(0.2)
    assert outbox.pending() == 1 and sender.sent == []  # handed over, not yet sent; the second waits for room
    sender.go.set()
    handing.join(timeout=5)
    outbox.close()
    assert outbox.ended.is_set() and sender.closed and not sender.closed_while_busy
    with pytest.raises(RuntimeError, match="outbox that has finished or closed"):
        hand(outbox, sender, 2)


def test_a_failed_send_is_raised_at_the_next_hand_over_and_by_finish():
    sender = FakeSender(fail_at=1)
    outbox = Outbox([sender], background=True)
    hand(outbox, sender, 0)
    hand(outbox, sender, 1)  # fails in the thread
    with pytest.raises(PeerLost, match="stage 2 has gone"):
        for n in range(2, 50):
            hand(outbox, sender, n)
    with pytest.raises(PeerLost, match="stage 2 has gone"):
        outbox.finish()
    assert sender.sent == [0]
    outbox.close()
    assert sender.closed


def test_ctrl_c_while_finishing_closes_the_links_only_after_the_thread_has_given_up():
    sender = FakeSender()  # its credits never come back: finish waits until interrupted
    outbox = Outbox([sender], background=True)
    hand(outbox, sender, 0)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        outbox.finish()
    timer.join()
    outbox.close()
    assert outbox.ended.is_set() and sender.closed and not sender.closed_while_busy
