"""A start-up check that CUDA IPC works between two devices on this host, before a run relies on it.

Some containers (no shared IPC namespace, restricted /dev/shm) and MIG instances cannot open
another process's device memory. Two short-lived processes try exactly what a link does (share
a tensor's handle, open it, read it back); the launcher falls back to zmq with a warning if it
fails. The caller needs no CUDA context of its own.
"""
from __future__ import annotations

import multiprocessing as mp
import shutil
import tempfile
import time

import msgpack
import torch
import zmq

from workers.transport import CudaIpcPayload, decode, encode

CHECK_TIMEOUT_S = 60.0
_N = 1 << 16  # elements of the test tensor


def _producer(endpoint: str, device: str) -> None:
    """Share a known tensor by handle and keep it alive until the consumer answers."""
    ctx = zmq.Context()
    socket = ctx.socket(zmq.PAIR)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        try:
            t = torch.arange(_N, dtype=torch.float32, device=device)
            frames = encode({}, {"x": t}, CudaIpcPayload())
        except Exception as err:  # no GPU, or no handle to be had: the consumer passes this on
            frames = [msgpack.packb({"error": f"{type(err).__name__}: {err}".splitlines()[0]})]
        socket.send_multipart(frames)
        socket.poll(int(CHECK_TIMEOUT_S * 1000))
    finally:
        ctx.destroy(linger=0)


def _consumer(endpoint: str, device: str, answer_endpoint: str) -> None:
    """Open the handle on `device`, release the producer, and tell the caller what happened ('' if all is well)."""
    ctx = zmq.Context()
    link, answer_socket = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for socket in (link, answer_socket):
        socket.setsockopt(zmq.LINGER, 1000)
    try:
        link.bind(endpoint)
        answer_socket.connect(answer_endpoint)
        if not link.poll(int(CHECK_TIMEOUT_S * 1000)):
            answer = "the producer process sent nothing"
        else:
            frames = link.recv_multipart(copy=False)
            try:
                producer_error = msgpack.unpackb(frames[0].bytes, raw=False).get("error")
                if producer_error:
                    raise RuntimeError(f"the producer could not share its tensor: {producer_error}")
                torch.cuda.set_device(device)
                x = decode(frames, torch.device(device)).tensors["x"]
                ok = bool(torch.equal(x.cpu(), torch.arange(_N, dtype=torch.float32)))
                answer = "" if ok else "the values read through the handle differ from those written"
                del x
            except Exception as err:  # a handle that cannot be opened is the answer, not a crash
                answer = f"{type(err).__name__}: {err}".splitlines()[0]
            link.send(b"done")
        answer_socket.send(msgpack.packb({"error": answer}))
    finally:
        ctx.destroy(linger=1000)


def cuda_ipc_error(producer_device: str, consumer_device: str) -> str | None:
    """Why CUDA IPC from `producer_device` to `consumer_device` fails on this host, or None if it works."""
    tmp = tempfile.mkdtemp(prefix="sgr-ipccheck-")
    spawn = mp.get_context("spawn")
    ctx = zmq.Context()
    answer = ctx.socket(zmq.PAIR)
    answer.bind(f"ipc://{tmp}/answer")
    processes = [spawn.Process(target=_consumer, args=(f"ipc://{tmp}/link", consumer_device, f"ipc://{tmp}/answer"),
                               name="consumer"),
                 spawn.Process(target=_producer, args=(f"ipc://{tmp}/link", producer_device), name="producer")]
    try:
        for p in processes:
            p.start()
        deadline = time.monotonic() + 2 * CHECK_TIMEOUT_S
        while not answer.poll(100):
            failed = [p for p in processes if p.exitcode not in (None, 0)]
            if failed:
                return f"the {failed[0].name} process failed (exit code {failed[0].exitcode})"
            if time.monotonic() > deadline:
                return f"the check processes gave no answer within {2 * CHECK_TIMEOUT_S:.0f} s"
        return msgpack.unpackb(answer.recv(), raw=False)["error"] or None
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        ctx.destroy(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)
