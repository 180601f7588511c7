import time
import threading

import msgpack
import pytest
import torch
import zmq

from workers.transport import PeerLost, Receiver, Sender, decode, encode


@pytest.fixture
def link(tmp_path):
    ctx = zmq.Context()
    receiver = Receiver(ctx, f"ipc://{tmp_path}/link", timeout_s=5)
    sender = Sender(ctx, f"ipc://{tmp_path}/link", depth=2, timeout_s=5)
    yield sender, receiver
    sender.close()
    receiver.close()
    ctx.term()


TENSORS = {
    "float32": torch.randn(3, 4, 5),
    "float64": torch.randn(7, dtype=torch.float64),
    "bfloat16": torch.randn(2, 3).to(torch.bfloat16),
    "float16": torch.randn(5).half(),
    "int64": torch.arange(10),
    "uint8": torch.randint(0, 255, (4, 4), dtype=torch.uint8),
    "bool": torch.rand(6) > 0.5,
    "scalar": torch.tensor(3.5),
    "empty": torch.empty(0, 3),
    "non_contiguous": torch.randn(4, 6).t()[::2],
}


def test_round_trip_of_dtypes_and_shapes(link):
    sender, receiver = link
    sender.send({"kind": "train", "step": 7, "epoch": 1, "note": "é"}, TENSORS)
    message = receiver.recv()
    assert message.header["kind"] == "train" and message.header["step"] == 7 and message.header["note"] == "é"
    for name, t in TENSORS.items():
        got = message.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    receiver.done(message)


def test_large_tensors_round_trip(link):
    sender, receiver = link
    big = torch.randn(16, 1024, 1024)  # 64 MB
    sender.send({"kind": "train"}, {"x": big})
    message = receiver.recv()
    assert torch.equal(message.tensors["x"], big)


def test_tensors_are_received_without_a_copy_of_the_frame():
    t = torch.arange(12, dtype=torch.float32)
    frames = encode({"kind": "x"}, {"t": t})
    buffer = bytearray(frames[1])
    message = decode([frames[0], buffer])
    buffer[0:4] = torch.tensor([42.0]).numpy().tobytes()
    assert message.tensors["t"][0].item() == 42.0  # the tensor is a view of the received bytes


def test_header_is_msgpack_not_pickle():
    frames = encode({"kind": "train", "step": 1}, {"x": torch.ones(2)})
    header = msgpack.unpackb(frames[0], raw=False)
    assert header["kind"] == "train" and header["tensors"][0]["dtype"] == "float32"


def test_none_tensors_are_skipped(link):
    sender, receiver = link
    sender.send({"kind": "train"}, {"x": torch.ones(2), "delta": None})
    assert set(receiver.recv().tensors) == {"x"}


def test_depth_bounds_unfinished_messages(link):
    sender, receiver = link
    sender.send({"n": 0}, {})
    sender.send({"n": 1}, {})
    blocked = threading.Event()

    def third():
        sender.send({"n": 2}, {})
        blocked.set()

    thread = threading.Thread(target=third)
    thread.start()
    time.sleep(0.3)
    assert not blocked.is_set()  # two unfinished: the third send waits for credit
    first = receiver.recv()
    receiver.done(first)
    thread.join(timeout=5)
    assert blocked.is_set()
    assert [receiver.recv().header["n"] for _ in range(2)] == [1, 2]


def test_a_peer_that_disappears_is_detected(tmp_path):
    ctx = zmq.Context()
    receiver = Receiver(ctx, f"ipc://{tmp_path}/lonely", timeout_s=0.5, peer="stage 1")
    start = time.time()
    with pytest.raises(PeerLost, match="stage 1 sent nothing for 0 s|stage 1 sent nothing for 1 s"):
        receiver.recv()
    assert time.time() - start < 3
    sender = Sender(ctx, f"ipc://{tmp_path}/gone", depth=1, timeout_s=0.5, peer="stage 3")
    sender.send({"n": 0}, {})
    with pytest.raises(PeerLost, match="stage 3 acknowledged nothing"):
        sender.send({"n": 1}, {})
    sender.close()
    receiver.close()
    ctx.term()


def test_tcp_transport(tmp_path):
    ctx = zmq.Context()
    receiver = Receiver(ctx, "tcp://127.0.0.1:*", timeout_s=5)
    sender = Sender(ctx, receiver.endpoint, timeout_s=5)
    sender.send({"kind": "train"}, {"x": torch.arange(5)})
    assert torch.equal(receiver.recv().tensors["x"], torch.arange(5))
    sender.close()
    receiver.close()
    ctx.term()
