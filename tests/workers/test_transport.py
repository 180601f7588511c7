import errno
import os
import threading
import time

import msgpack
import pytest
import torch
import zmq

from workers import transport
from workers.placement import LinkKind
from workers.transport import (SEGMENT_PREFIX, SHM_DIR, PeerLost, Receiver, Sender, SharedMemoryPayload,
                               decode, encode, named_segments, remove_segments)


@pytest.fixture(params=[(LinkKind.ZMQ, "ipc"), (LinkKind.SHARED_MEMORY, "unix"),
                        (LinkKind.SHARED_MEMORY, "ipc")],  # the last: a CUDA IPC link the start-up check refused
                ids=["zmq", "shm", "shm-over-zmq"])
def link(tmp_path, request):
    kind, scheme = request.param
    ctx = zmq.Context()
    receiver = Receiver(ctx, f"{scheme}://{tmp_path}/link", timeout_s=5)
    sender = Sender(ctx, f"{scheme}://{tmp_path}/link", kind, depth=2, timeout_s=5)
    yield sender, receiver
    sender.close()
    receiver.close()
    ctx.term()
    assert not own_segments()  # every exit path unlinks the slots


def own_segments() -> list[str]:
    """This process's shared-memory segments still named in /dev/shm."""
    return named_segments(os.getpid())


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
    sender.send({"n": 0}, {"x": torch.zeros(3)})
    sender.send({"n": 1}, {"x": torch.ones(3)})
    blocked = threading.Event()

    def third():
        sender.send({"n": 2}, {"x": torch.ones(3)})
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
    sender.send({"n": 0}, {"x": torch.ones(1)})
    with pytest.raises(PeerLost, match="stage 3 acknowledged nothing"):
        sender.send({"n": 1}, {"x": torch.ones(1)})
    sender.close()
    receiver.close()
    ctx.term()


def test_a_unix_link_waits_for_its_consumer_to_bind(tmp_path):
    ctx = zmq.Context()
    sender = Sender(ctx, f"unix://{tmp_path}/late", LinkKind.SHARED_MEMORY, timeout_s=5)
    sent = threading.Thread(target=sender.send, args=({"n": 0}, {"x": torch.arange(3.0)}))
    sent.start()  # nothing listens yet: the first send retries
    time.sleep(0.3)
    receiver = Receiver(ctx, f"unix://{tmp_path}/late", timeout_s=5)
    sent.join(timeout=5)
    message = receiver.recv()
    assert torch.equal(message.tensors["x"], torch.arange(3.0))
    assert not (tmp_path / "late").exists()  # its one peer connected: the name is gone
    receiver.done(message)
    sender.drain()
    sender.close()
    receiver.close()
    ctx.term()


def test_a_unix_link_reports_a_silent_peer_after_the_timeout(tmp_path):
    receiver = Receiver(None, f"unix://{tmp_path}/lonely", timeout_s=0.5, peer="stage 1")
    start = time.time()
    with pytest.raises(PeerLost, match="stage 1 sent nothing for 0 s|stage 1 sent nothing for 1 s"):
        receiver.recv()  # nobody connected
    sender = Sender(None, f"unix://{tmp_path}/lonely", LinkKind.SHARED_MEMORY, depth=1, timeout_s=0.5, peer="stage 2")
    sender.send({"n": 0}, {"x": torch.ones(1)})
    receiver.recv()  # connected, then silent: nothing more arrives, and no credit goes back
    with pytest.raises(PeerLost, match="stage 1 sent nothing"):
        receiver.recv()
    with pytest.raises(PeerLost, match="acknowledged nothing"):
        sender.send({"n": 1}, {"x": torch.ones(1)})
    assert time.time() - start < 5
    nobody = Sender(None, f"unix://{tmp_path}/nobody", LinkKind.SHARED_MEMORY, timeout_s=0.3, peer="stage 3")
    with pytest.raises(PeerLost, match=r"cannot send to stage 3 \(nothing listens at .*/nobody\)"):
        nobody.send({"n": 0}, {"x": torch.ones(1)})
    for end in (sender, receiver, nobody):
        end.close()
    assert not own_segments()


def test_a_unix_link_notices_at_once_that_its_peer_has_gone(tmp_path):
    receiver = Receiver(None, f"unix://{tmp_path}/a", timeout_s=30, peer="stage 1")
    sender = Sender(None, f"unix://{tmp_path}/a", LinkKind.SHARED_MEMORY, depth=1, timeout_s=30, peer="stage 2")
    sender.send({"n": 0}, {"x": torch.ones(1)})
    receiver.recv()
    receiver.close()
    start = time.time()
    with pytest.raises(PeerLost, match="stage 2 has gone"):  # long before the 30 s timeout
        sender.send({"n": 1}, {"x": torch.ones(1)})
    sender.close()
    receiver = Receiver(None, f"unix://{tmp_path}/b", timeout_s=30, peer="stage 1")
    sender = Sender(None, f"unix://{tmp_path}/b", LinkKind.SHARED_MEMORY, depth=1, timeout_s=30, peer="stage 2")
    sender.send({"n": 0}, {"x": torch.ones(1)})
    receiver.done(receiver.recv())
    sender.close()
    with pytest.raises(PeerLost, match="stage 1 has gone"):
        receiver.recv()
    receiver.close()
    assert time.time() - start < 5


def test_a_unix_link_refuses_what_it_cannot_carry(tmp_path):
    with pytest.raises(ValueError, match="longer than 107 bytes; set TMPDIR shorter"):
        Receiver(None, f"unix://{tmp_path}/{'x' * 120}")
    unused = Receiver(None, f"unix://{tmp_path}/unused", timeout_s=5)
    unused.close()
    assert not (tmp_path / "unused").exists()  # never connected: close removes the name
    receiver = Receiver(None, f"unix://{tmp_path}/frames", timeout_s=5)
    sender = Sender(None, f"unix://{tmp_path}/frames", LinkKind.ZMQ, timeout_s=5)  # tensors as frames
    with pytest.raises(ValueError, match="carries one header of at most 65536 bytes"):
        sender.send({"n": 0}, {"x": torch.ones(1)})
    sender.close()
    receiver.close()


def test_tcp_transport(tmp_path):
    ctx = zmq.Context()
    receiver = Receiver(ctx, "tcp://127.0.0.1:*", timeout_s=5)
    sender = Sender(ctx, receiver.endpoint, timeout_s=5)
    sender.send({"kind": "train"}, {"x": torch.arange(5)})
    assert torch.equal(receiver.recv().tensors["x"], torch.arange(5))
    sender.close()
    receiver.close()
    ctx.term()


def test_evaluation_messages_and_markers_do_not_take_the_training_windows_credit(link):
    sender, receiver = link
    for n in range(2):  # the training window (depth 2) is full
        sender.send({"kind": "train", "n": n}, {"x": torch.full((4,), float(n))})
    for n in range(2, 4):  # evaluation batches: a window of their own
        sender.send({"kind": "eval", "n": n}, {"x": torch.full((4,), float(n))}, training=False)
    sender.send({"kind": "checkpoint", "n": 4})  # a marker holds no memory: no credit at all
    blocked = threading.Event()

    def fifth():
        sender.send({"kind": "train", "n": 5}, {"x": torch.full((4,), 5.0)})
        blocked.set()

    thread = threading.Thread(target=fifth)
    thread.start()
    time.sleep(0.3)
    assert not blocked.is_set()  # the training window is still full
    messages = []
    for _ in range(6):
        messages.append(receiver.recv())
        assert torch.equal(messages[-1].tensors.get("x", torch.full((4,), 4.0)), torch.full((4,), float(len(messages) - 1)))
        receiver.done(messages[-1])
    thread.join(timeout=5)
    assert [m.header["n"] for m in messages] == [0, 1, 2, 3, 4, 5]  # one FIFO whatever the window


def test_a_shared_memory_slot_is_reused_only_after_its_credit_and_grows_when_needed(tmp_path):
    ctx = zmq.Context()
    receiver = Receiver(ctx, f"unix://{tmp_path}/link", timeout_s=5)
    sender = Sender(ctx, f"unix://{tmp_path}/link", LinkKind.SHARED_MEMORY, depth=2, timeout_s=5)
    try:
        sender.send({"n": 0}, {"x": torch.zeros(1000)})
        sender.send({"n": 1}, {"x": torch.ones(1000)})
        first, second = receiver.recv(), receiver.recv()
        assert len(own_segments()) == 2  # two slots in flight, named until the consumer's credit says it mapped them
        x0 = first.tensors["x"]
        receiver.done(first)
        sender.send({"n": 2}, {"x": torch.full((1000,), 2.0)})  # waits for a credit: first's slot comes back
        assert torch.equal(second.tensors["x"], torch.ones(1000))  # the unfinished message is untouched
        assert torch.equal(x0, torch.full((1000,), 2.0))  # a received tensor is a view of the slot: no copy
        receiver.done(second)
        receiver.done(receiver.recv())
        sender.send({"n": 3}, {"x": torch.arange(100_000.0)})  # bigger than any slot: one is replaced
        big = receiver.recv()
        assert torch.equal(big.tensors["x"], torch.arange(100_000.0))
        receiver.done(big)
        sender.drain()
        assert not own_segments()  # every slot's consumer has mapped it: no name is left
        assert len(sender.payload.slots) == 2 and max(s.size for s in sender.payload.slots) >= 400_000
    finally:
        sender.close()
        receiver.close()
        ctx.term()
    assert not own_segments()


def test_labels_are_copied_out_of_a_slot_so_a_stage_can_forward_them():
    payload = SharedMemoryPayload()
    try:
        frames = encode({"seq": 0}, {"x": torch.ones(3), "y": torch.arange(3)}, payload)
        assert len(frames) == 1  # only the header travels through the socket
        message = decode(frames)
        payload.slots[0].tensor(0, torch.float32, [3]).fill_(0)  # the producer reuses the slot
        assert torch.equal(message.tensors["x"], torch.zeros(3))  # a view of the slot
        assert torch.equal(message.tensors["y"], torch.arange(3))  # a copy
    finally:
        payload.close()


def test_segments_of_ended_processes_are_swept_and_live_ones_are_kept():
    dead = SHM_DIR / f"{SEGMENT_PREFIX}999999999-0"  # above pid_max: no such process
    live = SHM_DIR / f"{SEGMENT_PREFIX}{os.getpid()}-99"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    try:
        assert dead.name in remove_segments() and live.exists() and not dead.exists()
        assert remove_segments(os.getpid()) == [live.name] and not live.exists()
    finally:
        dead.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_a_full_dev_shm_is_a_one_line_error_that_names_the_fix_and_leaves_no_file(monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    payload = SharedMemoryPayload()
    with pytest.raises(OSError, match=r"shared memory is full: a 3\.8 MiB slot does not fit in /dev/shm .* "
                                      r"--shm-size=\.\.\.\) or use --set transport=zmq") as err:
        payload.pack(0, {"x": torch.ones(1_000_000)})
    assert "\n" not in str(err.value) and not own_segments()


def test_two_links_of_one_process_never_share_a_segment_name():
    first, second = SharedMemoryPayload(), SharedMemoryPayload()
    try:
        a = decode(encode({"seq": 0}, {"x": torch.ones(4)}, first))
        b = decode(encode({"seq": 0}, {"x": torch.zeros(4)}, second))
        assert first.slots[0].name != second.slots[0].name
        assert torch.equal(a.tensors["x"], torch.ones(4)) and torch.equal(b.tensors["x"], torch.zeros(4))
    finally:
        first.close()
        second.close()


def test_an_ipc_handle_opens_under_the_receivers_index_of_the_senders_gpu(monkeypatch):
    # the handle's first field is the producer's own index (0 here); this process numbers that GPU 1
    opened = []

    def new_shared_cuda(device, *rest):
        opened.append((device, *rest))
        return torch.UntypedStorage(16)  # stands in for the producer's memory (4 floats)

    monkeypatch.setattr(transport, "gpu_uuids", lambda: ("GPU-a", "GPU-b"))
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared_cuda", new_shared_cuda)
    meta = {"name": "x", "dtype": "float32", "shape": [2, 2], "ipc": [0, b"handle", 16, 0, b"ref", 0, b"event", True],
            "gpu": "GPU-b", "offset": 0, "stride": [2, 1]}
    t = transport._open_cuda(meta)
    assert opened == [(1, b"handle", 16, 0, b"ref", 0, b"event", True)] and t.shape == (2, 2)
