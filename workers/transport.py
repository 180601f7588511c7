"""How bytes move between processes: links between stages, and the records channel to the coordinator.

A link joins one producer to one consumer. Its frames (a msgpack header, then any raw frames)
travel through a channel its endpoint names: a zmq PAIR socket (`ipc://` on one host, `tcp://`
across hosts), or a Unix seqpacket socket (`unix://`) for shared-memory links, whose messages
are a header alone. Its tensors travel as the link's kind says (`placement.link_kind` decides,
once, in the launcher):
- `zmq`: one raw frame per tensor, sent without copies, received straight into tensors;
- `shm`: written into shared-memory slots the producer owns; the header names slot and offset,
  and the consumer's tensors are views of the slot (no copy on receipt);
- `cuda_ipc`: a device-memory handle in the header, for a stage's own GPU outputs only
  (`placement.travels_by_ipc`); the rest as frames.
Nothing is ever pickled. Adding a kind is one Payload class and one line in PAYLOADS; adding a channel, one
class and one line in `open_channel`.

Flow control is by credit: the producer may have at most `depth` unfinished training messages
(sent, not yet declared `done` by the consumer) and, in a window of their own, at most `depth`
unfinished evaluation messages; messages without tensors (markers) take no credit. A credit
coming back is what lets the producer free or reuse a message's memory (a CUDA IPC tensor, a
shared-memory slot), so a consumer must not touch a message's tensors after `done`.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import math
import mmap
import os
import select
import shutil
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq

from pipeline.lifeline import UNIX_PATH_MAX, process_alive
from workers.placement import HOST_TENSORS, UNIX_SCHEME, LinkKind, ipc_device_index, travels_by_ipc
from workers.security import RunKeys, secure

LINGER_MS = 1000
SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "sgr-shm-"  # sgr-shm-{owner pid}-{n}: a sweep can tell whose segment it is
ALIGN = 64  # bytes: every tensor in a slot starts on a cache line
MAX_DATAGRAM = 1 << 16  # bytes: a header on a unix:// link (a few hundred in practice)
MAX_VIEWS = 64  # tensor layouts a segment remembers
WAKE_MS = 100  # a wait on a link (or in an outbox) checks this often whether it was abandoned (_LinkEnd.abandon)
_SEGMENT_NUMBERS = itertools.count()  # one sequence per process: names stay unique across its links


class PeerLost(RuntimeError):
    """The process at the other end of a link stopped answering."""


class LinkAbandoned(RuntimeError):
    """A wait on a link was given up because the stage is closing it (another part of the run failed)."""


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


def _entry(name: str, t: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}


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


@functools.cache
def gpu_uuids() -> tuple[str, ...]:
    """The UUIDs of the GPUs this process sees, in its own numbering (CUDA_VISIBLE_DEVICES)."""
    return tuple(str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count()))


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
    """A tensor over another process's device memory, from its IPC handle (waits on the producer's event).

    The handle's first field is the producer's index of its GPU; this process may number that GPU otherwise, so the
    GPU's UUID, which travels with the handle, picks the index here."""
    torch.cuda._lazy_init()
    _, *rest = meta["ipc"]
    storage = torch.UntypedStorage._new_shared_cuda(ipc_device_index(meta["gpu"], gpu_uuids()), *rest)
    t = torch.empty(0, dtype=_dtype(meta["dtype"]), device=storage.device)
    return t.set_(storage, meta["offset"], meta["shape"], meta["stride"])


# --- payloads: how one kind of link carries a message's tensors ------------------------------


class FramePayload:
    """zmq: every tensor as a raw frame (GPU tensors staged through pinned host memory)."""

    def pack(self, seq: int, tensors: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], list[Any]]:
        """The header entries and frames of message `seq`."""
        return [_entry(name, t) for name, t in tensors.items()], [_tensor_bytes(_to_host(t)) for t in tensors.values()]

    def release(self, seq: int) -> None:
        """Message `seq`'s credit came back: the consumer is done with its tensors."""

    def close(self) -> None:
        """The link is closing: free whatever the payload holds."""


class CudaIpcPayload(FramePayload):
    """CUDA IPC: the stage's own GPU outputs go as handles and stay alive until their credit returns."""

    def __init__(self) -> None:
        self.alive: dict[int, list[torch.Tensor]] = {}

    def pack(self, seq: int, tensors: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], list[Any]]:
        meta, frames = [], []
        for name, t in tensors.items():
            entry = _entry(name, t)
            handle = _share_cuda(t) if travels_by_ipc(name, t.is_cuda, t.numel(), True) else None
            if handle is not None:
                entry.update(ipc=handle, gpu=gpu_uuids()[t.device.index], offset=t.storage_offset(),
                             stride=list(t.stride()))
            else:
                frames.append(_tensor_bytes(_to_host(t)))
            meta.append(entry)
        self.alive[seq] = list(tensors.values())
        return meta, frames

    def release(self, seq: int) -> None:
        self.alive.pop(seq, None)

    def close(self) -> None:
        self.alive.clear()


def _reserve(fd: int, path: Path, size: int) -> None:
    """Give a new segment `size` bytes of real memory now: a full /dev/shm is an error here, not a SIGBUS later."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        path.unlink(missing_ok=True)
        free = shutil.disk_usage(SHM_DIR).free
        raise OSError(err.errno, f"shared memory is full: a {size / 2**20:.1f} MiB slot does not fit in {SHM_DIR} "
                                 f"({free / 2**20:.1f} MiB free); give it more room (docker run --shm-size=...) or use "
                                 "--set transport=zmq") from None


class Segment:
    """A shared-memory file under /dev/shm, mapped; its creator unlinks the name once the consumer has mapped it."""

    def __init__(self, name: str, size: int = 0, create: bool = False) -> None:
        self.name, self.path, self.linked = name, SHM_DIR / name, create
        self.views: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
        if create:  # a name with this pid in it can only be left by a dead process that had the same pid
            self.path.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR if create else os.O_RDWR, 0o600)
        try:
            if create:
                _reserve(fd, self.path, size)
            self.size = os.fstat(fd).st_size
            # MAP_POPULATE: the pages are faulted in now, not during the first copy into or out of them
            self.map = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))  # where the map starts in this process

    def holds(self, t: torch.Tensor) -> bool:
        """Whether a CPU tensor's memory lies in this segment (a view of it)."""
        return self.address <= t.data_ptr() < self.address + self.size

    def tensor(self, offset: int, dtype: torch.dtype, shape: list[int] | torch.Size) -> torch.Tensor:
        """A tensor over the segment's bytes from `offset` on (no copy; a new tensor object each time)."""
        key = (offset, dtype, tuple(shape))
        view = self.views.get(key)
        if view is None:  # a link's messages repeat a few layouts: made once, each message's tensor is then one detach
            if len(self.views) >= MAX_VIEWS:
                self.views.clear()
            view = self.views[key] = torch.frombuffer(self.map, dtype=dtype, count=math.prod(shape),
                                                      offset=offset).view(shape)
        return view.detach()

    def unlink(self) -> None:
        """Remove the segment's name (its memory stays while a process maps it); once is enough."""
        if self.linked:
            self.path.unlink(missing_ok=True)
            self.linked = False


class SharedMemoryPayload:
    """Shared memory: tensors are copied into a slot this process owns; only the slot's name and offsets travel.

    A slot is a segment sized on first use and replaced by a bigger one when a message does not
    fit; it is reused only after its message's credit came back. The credit also says the consumer
    has mapped the segment, so its name is unlinked then: the memory lives while either end maps
    it and nothing stays in /dev/shm, whichever process dies later.
    """

    def __init__(self) -> None:
        self.slots: list[Segment] = []
        self.free: list[int] = []
        self.busy: dict[int, int] = {}  # seq -> slot

    def pack(self, seq: int, tensors: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], list[Any]]:
        meta, offsets, end = [], [], 0
        for t in tensors.values():
            offsets.append(end)
            end += -(-t.nbytes // ALIGN) * ALIGN
        slot = self._slot(end)
        segment = self.slots[slot]
        for (name, t), offset in zip(tensors.items(), offsets):
            if t.nbytes:
                segment.tensor(offset, t.dtype, t.shape).copy_(t.detach())
            meta.append({**_entry(name, t), "shm": segment.name, "slot": slot, "offset": offset})
        self.busy[seq] = slot
        return meta, []

    def _slot(self, nbytes: int) -> int:
        """A free slot of at least `nbytes`: the smallest that fits, else the largest one grown, else a new one."""
        fitting = [s for s in self.free if self.slots[s].size >= nbytes]
        if fitting:
            slot = min(fitting, key=lambda s: self.slots[s].size)
            self.free.remove(slot)
            return slot
        segment = Segment(f"{SEGMENT_PREFIX}{os.getpid()}-{next(_SEGMENT_NUMBERS)}", max(nbytes, ALIGN), create=True)
        if self.free:  # grow: the old segment's name is gone already, its memory goes with the last map
            slot = max(self.free, key=lambda s: self.slots[s].size)
            self.free.remove(slot)
            self.slots[slot] = segment
            return slot
        self.slots.append(segment)
        return len(self.slots) - 1

    def release(self, seq: int) -> None:
        slot = self.busy.pop(seq, None)
        if slot is not None:
            self.slots[slot].unlink()  # the consumer has mapped it
            self.free.append(slot)

    def close(self) -> None:
        for segment in self.slots:
            segment.unlink()
        self.slots.clear()


PAYLOADS = {LinkKind.ZMQ: FramePayload, LinkKind.SHARED_MEMORY: SharedMemoryPayload, LinkKind.CUDA_IPC: CudaIpcPayload}


def named_segments(owner: int) -> list[str]:
    """The names process `owner`'s shared-memory segments still have in /dev/shm."""
    return sorted(path.name for path in SHM_DIR.glob(f"{SEGMENT_PREFIX}{owner}-*"))


def remove_segments(owner: int | None = None) -> list[str]:
    """Unlink the shared-memory segments of process `owner`, or (None) of every process that has ended.

    Normally no name outlives the first credit of its slot; this sweeps up after a process killed
    between creating a slot and its first credit (the launcher runs it when its stages have ended).
    """
    removed = []
    for path in SHM_DIR.glob(f"{SEGMENT_PREFIX}*"):
        try:
            pid = int(path.name.removeprefix(SEGMENT_PREFIX).split("-")[0])
        except ValueError:
            continue
        if pid == owner or (owner is None and not process_alive(pid)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


class SegmentMaps:
    """The consumer's maps of its producer's slots, opened on first sight and replaced when a slot grows."""

    def __init__(self) -> None:
        self.by_slot: dict[int, Segment] = {}

    def get(self, slot: int, name: str) -> Segment:
        segment = self.by_slot.get(slot)
        if segment is None or segment.name != name:
            segment = self.by_slot[slot] = Segment(name)  # the old map goes when its last tensor does
        return segment


def encode(header: dict[str, Any], tensors: dict[str, torch.Tensor | None],
           payload: FramePayload | SharedMemoryPayload | None = None) -> list[Any]:
    """Frames of one message: the msgpack header, then whatever frames the payload (default: zmq frames) adds."""
    tensors = {name: t for name, t in tensors.items() if t is not None}
    meta, frames = (payload or FramePayload()).pack(header.get("seq", 0), tensors)
    return [msgpack.packb({**header, "tensors": meta}, use_bin_type=True), *frames]


def decode(frames: list[Any], device: torch.device | None = None, maps: SegmentMaps | None = None) -> Message:
    """A Message from received frames; frames and slots become tensors without a copy, IPC handles are opened.

    Tensors are placed on `device`, except those a stage forwards (HOST_TENSORS: labels, InfoPro's images): they
    stay on the host, where the stage forwards them from, and the stage moves them to its device itself. They are
    copied out of a slot, since a forwarded tensor must outlive this message's credit.
    """
    header = msgpack.unpackb(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0], raw=False)
    meta = header.pop("tensors", [])
    raw = iter(frames[1:])
    maps = maps or SegmentMaps()
    tensors = {}
    for entry in meta:
        dtype, shape, name = _dtype(entry["dtype"]), entry["shape"], entry["name"]
        if "ipc" in entry:
            t = _open_cuda(entry)
        elif "shm" in entry:
            if math.prod(shape) == 0:
                t = torch.empty(shape, dtype=dtype)
            else:
                t = maps.get(entry["slot"], entry["shm"]).tensor(entry["offset"], dtype, shape)
                t = t.clone() if name in HOST_TENSORS else t
        else:
            frame = next(raw)
            buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
            if len(buffer) == 0:
                t = torch.empty(shape, dtype=dtype)
            else:
                t = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)
        if device is not None and t.device != device and name not in HOST_TENSORS:
            t = t.to(device, non_blocking=False)
        tensors[name] = t
    return Message(header, tensors)


def _wait_readable(socket: zmq.Socket, timeout_ms: int) -> bool:
    """Poll `socket` for up to `timeout_ms`; whether a message arrived."""
    return bool(socket.poll(timeout_ms, zmq.POLLIN))


# --- channels: how a link's frames travel between its two processes ---------------------------


class ZmqChannel:
    """A zmq PAIR socket: `ipc://` on one host, `tcp://` between hosts (CURVE with the run's keys)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, bind: bool, keys: RunKeys | None = None) -> None:
        self.socket = ctx.socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.abandoned = threading.Event()  # set: whoever waits on this channel gives up (_LinkEnd.abandon)
        secure(self.socket, keys, server=bind)
        if bind:
            self.socket.bind(endpoint)
            endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port of tcp port '*'
        else:
            self.socket.connect(endpoint)  # zmq connects once the other end binds
        self.endpoint = endpoint

    def send(self, frames: list[Any]) -> None:
        self.socket.send_multipart(frames, copy=False)

    def poll(self, timeout_ms: int) -> bool:
        """Whether a message arrives within `timeout_ms`."""
        return _wait_readable(self.socket, timeout_ms)

    def recv(self) -> list[Any]:
        return self.socket.recv_multipart(copy=False)

    def close(self) -> None:
        self.socket.close()


class UnixChannel:
    """A Unix seqpacket socket (`unix://PATH`), one datagram per message: for links whose messages are a header
    alone (shared memory). Without zmq's I/O threads a round trip takes about half as long.

    The bound end accepts its one peer on first use, then stops listening and removes the socket's name; the
    connecting end retries until the bound end exists. The socket lives in a folder only this user can open. A
    peer that ends closes the socket: `recv` raises EOFError.
    An end that closes with messages unread resets the connection, and the peer may see that before what was
    queued for it: a link's last message (`stop`) is answered by its credit, which the sender drains, so neither
    end closes with anything unread.
    """

    def __init__(self, endpoint: str, bind: bool, timeout_s: float) -> None:
        self.endpoint, self.path, self.timeout_s = endpoint, endpoint.removeprefix(UNIX_SCHEME), timeout_s
        if len(os.fsencode(self.path)) > UNIX_PATH_MAX:
            raise ValueError(f"the socket path {self.path} is longer than {UNIX_PATH_MAX} bytes; set TMPDIR shorter")
        self.listener: socket.socket | None = None
        self.peer: socket.socket | None = None
        self.abandoned = threading.Event()  # set: whoever waits on this channel gives up (_LinkEnd.abandon)
        self.readable = select.poll()
        self.buffer = bytearray(MAX_DATAGRAM)
        if bind:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.listener.bind(self.path)
            self.listener.listen(1)

    def _adopt(self, peer: socket.socket) -> None:
        peer.settimeout(self.timeout_s)  # a send into a peer that stopped reading fails after this long
        self.peer = peer
        self.readable.register(peer, select.POLLIN)

    def _connect(self) -> None:
        """The connecting end, on first send: connect, retrying while the bound end does not exist yet."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            peer.settimeout(self.timeout_s)
            try:
                peer.connect(self.path)
                return self._adopt(peer)
            except (FileNotFoundError, ConnectionRefusedError):
                peer.close()
                if self.abandoned.is_set():
                    raise LinkAbandoned(f"gave up connecting to {self.path}: the link is closing") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listens at {self.path}") from None
                time.sleep(0.01)

    def send(self, frames: list[Any]) -> None:
        if len(frames) != 1 or len(frames[0]) > MAX_DATAGRAM:
            raise ValueError(f"a {UNIX_SCHEME} link carries one header of at most {MAX_DATAGRAM} bytes per message")
        if self.peer is None:
            if self.listener is not None:
                raise RuntimeError(f"{self.endpoint}: the bound end sends only after it has received")
            self._connect()
        self.peer.send(frames[0])

    def poll(self, timeout_ms: int) -> bool:
        """Whether a message (or the peer's end) arrives within `timeout_ms`; the bound end first accepts its peer."""
        if self.peer is None:
            if self.listener is None:
                raise RuntimeError(f"{self.endpoint}: the connecting end waits for an answer before it sent anything")
            start, arrival = time.monotonic(), select.poll()
            arrival.register(self.listener, select.POLLIN)
            if not arrival.poll(timeout_ms):
                return False
            self._adopt(self.listener.accept()[0])
            self._stop_listening()  # its one peer is here: the name goes, nobody else can connect
            timeout_ms = max(0, int(timeout_ms - 1000 * (time.monotonic() - start)))
        return bool(self.readable.poll(timeout_ms))

    def recv(self) -> list[Any]:
        size = self.peer.recv_into(self.buffer)
        if size == 0:
            raise EOFError(f"{self.endpoint} was closed by its peer")
        return [self.buffer[:size]]  # a copy: the buffer takes the next message

    def _stop_listening(self) -> None:
        self.listener.close()
        self.listener = None
        Path(self.path).unlink(missing_ok=True)

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        if self.listener is not None:
            self._stop_listening()


def open_channel(ctx: zmq.Context, endpoint: str, bind: bool, timeout_s: float,
                 keys: RunKeys | None = None) -> ZmqChannel | UnixChannel:
    """The channel an endpoint names: `unix://PATH` a Unix socket, anything else (`ipc://`, `tcp://`) zmq."""
    if endpoint.startswith(UNIX_SCHEME):
        return UnixChannel(endpoint, bind, timeout_s)
    return ZmqChannel(ctx, endpoint, bind, keys)


# --- links: the two ends ---------------------------------------------------------------------


class _LinkEnd:
    """What both ends of a link share: the channel, and turning a silent or vanished peer into PeerLost."""

    def __init__(self, channel: ZmqChannel | UnixChannel, timeout_s: float, peer: str) -> None:
        self.channel, self.timeout_ms, self.peer = channel, int(timeout_s * 1000), peer

    def _send(self, frames: list[Any]) -> None:
        try:
            self.channel.send(frames)
        except OSError as err:  # a Unix link: the peer is gone (broken pipe, reset) or stopped reading (timeout)
            raise PeerLost(f"cannot send to {self.peer} ({err.strerror or err}); it is dead or hung") from None

    def _receive(self, silence: str) -> list[Any]:
        """The next message's frames; PeerLost naming `silence` (what the peer failed to do) after the timeout."""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while not self.channel.poll(min(WAKE_MS, self.timeout_ms)):
            if self.channel.abandoned.is_set():
                raise LinkAbandoned(f"gave up waiting for {self.peer}: the link is closing")
            if time.monotonic() >= deadline:
                raise PeerLost(f"{self.peer} {silence} for {self.timeout_ms / 1000:.0f} s; it is dead or hung")
        try:
            return self.channel.recv()
        except (EOFError, OSError):
            raise PeerLost(f"{self.peer} has gone: it closed its end of the link") from None

    def abandon(self) -> None:
        """Make a wait on this link (for a message, or for its consumer to start), in any thread, give up within
        WAKE_MS (LinkAbandoned)."""
        self.channel.abandoned.set()

    def close(self) -> None:
        self.channel.close()


class Sender(_LinkEnd):
    """The producing end of a link: connects, sends, and waits for credit when a window is full."""

    def __init__(self, ctx: zmq.Context, endpoint: str, kind: LinkKind = LinkKind.ZMQ, depth: int = 2,
                 timeout_s: float = 120.0, peer: str = "the next stage", keys: RunKeys | None = None) -> None:
        super().__init__(open_channel(ctx, endpoint, False, timeout_s, keys), timeout_s, peer)
        self.kind, self.payload = kind, PAYLOADS[kind]()
        self.depth = depth
        self.seq = 0
        self.in_flight: OrderedDict[int, bool | None] = OrderedDict()  # seq -> training window? (None: a marker)

    def send(self, header: dict[str, Any], tensors: dict[str, torch.Tensor | None] | None = None,
             training: bool = True) -> float:
        """Send one message; with tensors, first wait until its window (training or evaluation) has room.

        Returns the seconds spent waiting for that room (for the stage's trace)."""
        tensors = {name: t for name, t in (tensors or {}).items() if t is not None}
        window = training if tensors else None
        start, waited = time.perf_counter(), 0.0
        while window is not None and sum(w is window for w in self.in_flight.values()) >= self.depth:
            self._wait_credit()
            waited = time.perf_counter() - start
        self._send(encode({**header, "seq": self.seq}, tensors, self.payload))
        self.in_flight[self.seq] = window
        self.seq += 1
        return waited

    def _wait_credit(self) -> None:
        done = msgpack.unpackb(self._receive("acknowledged nothing")[0], raw=False)["done"]
        self.in_flight.pop(done, None)
        self.payload.release(done)

    def drain(self) -> None:
        """Wait until the consumer has finished every message sent."""
        while self.in_flight:
            self._wait_credit()

    def close(self) -> None:
        super().close()
        self.payload.close()


class Receiver(_LinkEnd):
    """The consuming end of a link: binds, receives in order, and returns credit with `done`."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_s: float = 120.0,
                 device: torch.device | None = None, peer: str = "the previous stage",
                 keys: RunKeys | None = None) -> None:
        super().__init__(open_channel(ctx, endpoint, True, timeout_s, keys), timeout_s, peer)
        self.endpoint = self.channel.endpoint
        self.device = device
        self.maps = SegmentMaps()

    def recv(self) -> Message:
        """The next message, or PeerLost if none arrives within the timeout (or the producer is gone)."""
        return decode(self._receive("sent nothing"), self.device, self.maps)

    def done(self, message: Message) -> None:
        """Tell the producer this message is finished with (its tensors may be freed or overwritten): one credit back."""
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        message.tensors.clear()
        self._send([msgpack.packb({"done": message.header["seq"]})])

    def holds(self, t: torch.Tensor) -> bool:
        """Whether `t` is a view of one of this link's shared-memory slots, which its producer may overwrite once
        the message's credit went back."""
        return not t.is_cuda and t.numel() > 0 and any(seg.holds(t) for seg in self.maps.by_slot.values())

    def close(self) -> None:
        super().close()
        self.maps.by_slot.clear()


# --- records: stages -> coordinator ---------------------------------------------------------


class Reporter:
    """Pushes msgpack records from a stage to the coordinator."""

    def __init__(self, ctx: zmq.Context, endpoint: str, rank: int, keys: RunKeys | None = None,
                 worker: int | None = None) -> None:
        self.socket = ctx.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        secure(self.socket, keys, server=False)
        self.socket.connect(endpoint)
        self.rank = rank  # the stage
        self.worker = rank if worker is None else worker  # the process among all of the run's (replicas apart)

    def send(self, record: dict[str, Any]) -> None:
        self.socket.send(msgpack.packb({"stage": self.rank, "worker": self.worker, **record}, use_bin_type=True))

    def close(self) -> None:
        self.socket.close()


class Collector:
    """The coordinator's end of the records channel: binds, and receives every stage's records."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys: RunKeys | None = None) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        secure(self.socket, keys, server=True)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def wait(self, timeout_ms: int) -> bool:
        """Whether a record arrives within `timeout_ms`."""
        return _wait_readable(self.socket, timeout_ms)

    def recv(self) -> dict[str, Any]:
        return msgpack.unpackb(self.socket.recv(), raw=False)

    def close(self) -> None:
        self.socket.close()
