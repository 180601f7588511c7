"""How tensors move between stage processes; a stage only ever calls `send`, `recv` and `done`.

A link joins one producer to one consumer over a zmq PAIR socket (`ipc://` on one host,
`tcp://` across hosts). A message is a msgpack header followed by one raw frame per CPU
tensor (sent without copies, received straight into tensors), or, with CUDA IPC, only a
device-memory handle in the header (for a stage's own outputs only: `placement.travels_by_ipc`).
Nothing is ever pickled.

Flow control is by credit: the producer may have at most `depth` messages that the consumer
has not yet declared `done`; that bound is the only buffering between two stages, and it
also keeps CUDA IPC tensors alive until the consumer has finished with them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import zmq

from workers.placement import HOST_TENSORS, travels_by_ipc
from workers.security import RunKeys, secure

LINGER_MS = 1000


class PeerLost(RuntimeError):
    """The process at the other end of a link stopped answering."""


@dataclass
class Message:
    """A received message: its header (kind, step, epoch, ...) and its tensors by name."""

    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a message header")
    return dtype


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes without a copy (after making it contiguous)."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a GPU tensor, staged through pinned memory (fast DMA); CPU tensors pass through."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t)


def _share_cuda(t: torch.Tensor) -> list[Any] | None:
    """The CUDA IPC handle of a tensor's storage, as msgpack-able values; None if the storage cannot be shared.

    A tensor this process itself received by IPC cannot be shared again (PyTorch refuses); the
    placement rule keeps such tensors off IPC, and this is the backstop: it goes as a frame.
    """
    try:
        return list(t.untyped_storage()._share_cuda_())
    except RuntimeError:
        return None


def _open_cuda(meta: dict[str, Any]) -> torch.Tensor:
    """A tensor over another process's device memory, from its IPC handle (waits on the producer's event)."""
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(*meta["ipc"])
    t = torch.empty(0, dtype=_dtype(meta["dtype"]), device=storage.device)
    return t.set_(storage, meta["offset"], meta["shape"], meta["stride"])


def encode(header: dict[str, Any], tensors: dict[str, torch.Tensor | None], cuda_ipc: bool = False) -> list[Any]:
    """Frames of one message: the msgpack header, then a raw frame per tensor not sent by IPC handle."""
    meta, frames = [], []
    for name, t in tensors.items():
        if t is None:
            continue
        entry: dict[str, Any] = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        handle = _share_cuda(t) if travels_by_ipc(name, t.is_cuda, t.numel(), cuda_ipc) else None
        if handle is not None:
            entry.update(ipc=handle, offset=t.storage_offset(), stride=list(t.stride()))
        else:
            frames.append(_tensor_bytes(_to_host(t)))
        meta.append(entry)
    return [msgpack.packb({**header, "tensors": meta}, use_bin_type=True), *frames]


def decode(frames: list[Any], device: torch.device | None = None) -> Message:
    """A Message from received frames; raw frames become tensors without a copy, IPC handles are opened.

    Tensors are placed on `device`, except the labels (HOST_TENSORS): they stay on the host, where
    the stage forwards them from, and the stage moves them to its device itself.
    """
    header = msgpack.unpackb(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0], raw=False)
    meta = header.pop("tensors", [])
    raw = iter(frames[1:])
    tensors = {}
    for entry in meta:
        dtype, shape = _dtype(entry["dtype"]), entry["shape"]
        if "ipc" in entry:
            t = _open_cuda(entry)
        else:
            frame = next(raw)
            buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
            if len(buffer) == 0:
                t = torch.empty(shape, dtype=dtype)
            else:
                t = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)
        if device is not None and t.device != device and entry["name"] not in HOST_TENSORS:
            t = t.to(device, non_blocking=False)
        tensors[entry["name"]] = t
    return Message(header, tensors)


def _wait_readable(socket: zmq.Socket, timeout_ms: int) -> bool:
    """Poll `socket` for up to `timeout_ms`; whether a message arrived."""
    return bool(socket.poll(timeout_ms, zmq.POLLIN))


class Sender:
    """The producing end of a link: connects, sends, and waits for credit when `depth` messages are unfinished."""

    def __init__(self, ctx: zmq.Context, endpoint: str, depth: int = 2, timeout_s: float = 120.0,
                 cuda_ipc: bool = False, peer: str = "the next stage", keys: RunKeys | None = None) -> None:
        self.socket = ctx.socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        secure(self.socket, keys, server=False)
        self.socket.connect(endpoint)
        self.depth, self.timeout_ms, self.cuda_ipc, self.peer = depth, int(timeout_s * 1000), cuda_ipc, peer
        self.seq = 0
        self.in_flight: OrderedDict[int, list[torch.Tensor]] = OrderedDict()  # seq -> tensors kept alive

    def send(self, header: dict[str, Any], tensors: dict[str, torch.Tensor | None] | None = None) -> None:
        """Send one message, first waiting until fewer than `depth` are unfinished at the consumer."""
        while len(self.in_flight) >= self.depth:
            self._wait_credit()
        tensors = tensors or {}
        frames = encode({**header, "seq": self.seq}, tensors, self.cuda_ipc)
        self.socket.send_multipart(frames, copy=False)
        self.in_flight[self.seq] = [t for t in tensors.values() if t is not None] if self.cuda_ipc else []
        self.seq += 1

    def _wait_credit(self) -> None:
        if not _wait_readable(self.socket, self.timeout_ms):
            raise PeerLost(f"{self.peer} acknowledged nothing for {self.timeout_ms / 1000:.0f} s; it is dead or hung")
        done = msgpack.unpackb(self.socket.recv(), raw=False)["done"]
        self.in_flight.pop(done, None)

    def drain(self) -> None:
        """Wait until the consumer has finished every message sent."""
        while self.in_flight:
            self._wait_credit()

    def close(self) -> None:
        self.socket.close()


class Receiver:
    """The consuming end of a link: binds, receives in order, and returns credit with `done`."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_s: float = 120.0,
                 device: torch.device | None = None, peer: str = "the previous stage",
                 keys: RunKeys | None = None) -> None:
        self.socket = ctx.socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        secure(self.socket, keys, server=True)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.timeout_ms, self.device, self.peer = int(timeout_s * 1000), device, peer

    def recv(self) -> Message:
        """The next message, or PeerLost if none arrives within the timeout."""
        if not _wait_readable(self.socket, self.timeout_ms):
            raise PeerLost(f"{self.peer} sent nothing for {self.timeout_ms / 1000:.0f} s; it is dead or hung")
        return decode(self.socket.recv_multipart(copy=False), self.device)

    def done(self, message: Message) -> None:
        """Tell the producer this message is finished with (its tensors may be freed): one credit back."""
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        message.tensors.clear()
        self.socket.send(msgpack.packb({"done": message.header["seq"]}))

    def close(self) -> None:
        self.socket.close()
