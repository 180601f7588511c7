"""Transport between two stage processes: bandwidth and per-message latency of each link kind.

A sender process pushes tensors through workers.transport's Sender to a Receiver here, with
the credit flow control the pipeline uses (depth 2 for bandwidth; depth 1 for the latency of
a tiny message, so each message waits for its credit: one full round trip). Links: zmq frames
over ipc:// and tcp://, shared memory (the header over a Unix socket), and CUDA IPC, measured
only when CUDA is available. A plain memory copy (torch copy_) of the same size is the
bandwidth's yardstick; bare ping-pongs (pyzmq over ipc://, a Unix socket) are the latency's.
The per-message latency is compared with the shortest ResNet-32 stage step at batch 128
(K = 3, SGR), measured here in one process with the same thread count.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/transport.py`

import torch
import zmq

from pipeline.data import train_batches
from workers.placement import LinkKind, link_endpoint
from workers.transport import MAX_DATAGRAM, Receiver, Sender
from bench.common import (bench_config, bench_data, build_steps, markdown_table, meta, median_seconds, parse, parser,
                          pyplot, size_of, stage_step_seconds, write_results)

KB, MB = 1 << 10, 1 << 20
SIZES = {  # tensor sizes, bytes per size to move, tiny messages to time, model and batch of the stage step
    "smoke": ([64 * KB, 4 * MB], 16 * MB, 200, "resnet8", 16),
    "quick": ([64 * KB, 256 * KB, MB, 4 * MB, 16 * MB, 64 * MB], 512 * MB, 2000, "resnet32", 128),
    "full": ([64 * KB, 256 * KB, MB, 4 * MB, 16 * MB, 64 * MB], 4096 * MB, 20000, "resnet32", 128),
}
TINY = 4  # bytes of the latency probe's tensor
LINKS = {"ipc": LinkKind.ZMQ, "tcp": LinkKind.ZMQ, "shm": LinkKind.SHARED_MEMORY, "cuda_ipc": LinkKind.CUDA_IPC}
SHM_MIN_VS_MEMCPY, MAX_LATENCY_US = 0.5, 150.0  # targets: shared memory at 4 MB and up; a tiny message's round trip


def _send_plan(endpoint: str, plan: list[tuple[int, int, int]], link: str) -> None:
    """Sender process: for each (depth, bytes, count) phase, one untimed message, then `count` more."""
    torch.set_num_threads(1)
    ctx = zmq.Context()
    cuda = link == "cuda_ipc"
    sender = Sender(ctx, endpoint, LINKS[link], depth=1, timeout_s=60)
    for depth, nbytes, count in plan:
        sender.drain()
        sender.depth = depth  # this phase's credit window
        tensor = torch.ones(nbytes // 4, device="cuda" if cuda else "cpu")
        for i in range(count + 1):
            sender.send({"kind": "train", "step": i}, {"x": tensor})
    sender.drain()
    sender.close()
    ctx.term()


def link_seconds(link: str, plan: list[tuple[int, int, int]]) -> list[list[float]]:
    """Seconds of each message of each phase of the plan, timed at the receiving end of a link to a new process."""
    cuda = link == "cuda_ipc"
    tmp = tempfile.mkdtemp(prefix="sgr-bench-")
    ctx = zmq.Context()
    endpoint = link_endpoint(LINKS[link], tmp, "link", "127.0.0.1" if link == "tcp" else None)
    receiver = Receiver(ctx, endpoint, timeout_s=60, device=torch.device("cuda") if cuda else None)
    try:
        with peer_process(_send_plan, receiver.endpoint, plan, link):
            return [seconds_per_call(lambda: receiver.done(receiver.recv()), count) for _, _, count in plan]
    finally:
        receiver.close()
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def peer_process(target: Callable[..., None], *args: Any) -> Iterator[None]:
    """`target(*args)` in a new (spawned) process while the block runs; joined after it (killed if still alive)."""
    child = mp.get_context("spawn").Process(target=target, args=args)
    child.start()
    try:
        yield
        child.join(timeout=60)
    finally:
        if child.is_alive():
            child.kill()


def seconds_per_call(call: Callable[[], object], count: int) -> list[float]:
    """Seconds of each of `count` calls of `call`, after one untimed call (reading the clock costs ~0.1 µs)."""
    call()
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def _bare_socket(ctx: zmq.Context) -> zmq.Socket:
    """A PAIR socket for the bare ping-pong: a lost peer is an error (zmq.Again) after 60 s, not a hang."""
    pair = ctx.socket(zmq.PAIR)
    for option in (zmq.RCVTIMEO, zmq.SNDTIMEO):
        pair.setsockopt(option, 60_000)
    pair.setsockopt(zmq.LINGER, 0)
    return pair


def _echo(endpoint: str, count: int) -> None:
    """The floor's other end: answer each of `count` + 1 messages with one byte, as a receiver's credit does."""
    ctx = zmq.Context()
    pair = _bare_socket(ctx)
    pair.connect(endpoint)
    for _ in range(count + 1):
        pair.recv_multipart(copy=False)
        pair.send(b"d")
    pair.close()
    ctx.term()


def bare_zmq_seconds(count: int) -> float:
    """Seconds per round trip of a bare pyzmq PAIR ping-pong over ipc:// (a 4 B frame, a 1 B answer) to a new
    process: what this machine's zmq costs before any header, tensor or credit bookkeeping (the latency's yardstick)."""
    tmp = tempfile.mkdtemp(prefix="sgr-bench-")
    ctx = zmq.Context()
    pair = _bare_socket(ctx)
    pair.bind(f"ipc://{tmp}/bare")
    try:
        with peer_process(_echo, f"ipc://{tmp}/bare", count):
            return seconds_per_call(lambda: (pair.send(b"ping"), pair.recv()), count)
    finally:
        pair.close()
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)


def _unix_echo(path: str, count: int) -> None:
    """The Unix floor's other end: connect, then answer each of `count` + 1 messages with one byte."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as peer:
        peer.settimeout(60)
        peer.connect(path)
        for _ in range(count + 1):
            peer.recv(MAX_DATAGRAM)
            peer.send(b"d")


def bare_unix_seconds(count: int) -> float:
    """Seconds per round trip of a bare Unix seqpacket ping-pong (a 4 B datagram, a 1 B answer) to a new process:
    the floor of the shared-memory link, whose header travels this way."""
    tmp = tempfile.mkdtemp(prefix="sgr-bench-")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.settimeout(60)
    listener.bind(f"{tmp}/bare")
    listener.listen(1)
    try:
        with peer_process(_unix_echo, f"{tmp}/bare", count):
            with listener.accept()[0] as peer:
                peer.settimeout(60)
                return seconds_per_call(lambda: (peer.send(b"ping"), peer.recv(MAX_DATAGRAM)), count)
    finally:
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)


def memcpy_seconds(nbytes: int, reps: int) -> float:
    """Median seconds of one torch copy_ of nbytes between two CPU tensors."""
    src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    return median_seconds(lambda: dst.copy_(src), reps)


def main(argv: list[str] | None = None) -> dict:
    """Measure memcpy and each link's bandwidth and latency; print the table last."""
    args = parse(parser("transport", "zmq ipc/tcp bandwidth and latency against memcpy", threads=1), argv)
    sizes, volume, tiny_count, model, batch = SIZES[size_of(args)]
    plan = [(1, TINY, tiny_count)] + [(2, n, max(8, min(2000, volume // n))) for n in sizes]
    links = [link for link in LINKS if link != "cuda_ipc" or torch.cuda.is_available()]
    seconds = {link: link_seconds(link, plan) for link in links}
    rows = []
    for i, n in enumerate(sizes, start=1):
        copy = memcpy_seconds(n, max(5, min(200, volume // n // 4)))
        row = {"bytes": n, "memcpy_GBps": n / copy / 1e9}
        for link in LINKS:
            row[f"{link}_GBps"] = n / statistics.fmean(seconds[link][i]) / 1e9 if link in seconds else None
        row["ipc_vs_memcpy"] = row["ipc_GBps"] / row["memcpy_GBps"]
        row["shm_vs_memcpy"] = row["shm_GBps"] / row["memcpy_GBps"]
        rows.append(row)
    # a round trip's median (the typical message) is the target's measure; the mean, with the machine's hiccups, too
    round_trips = {link: seconds[link][0] for link in LINKS if link in seconds}
    round_trips["bare_zmq"] = bare_zmq_seconds(tiny_count)
    round_trips["bare_unix"] = bare_unix_seconds(tiny_count)
    latency_us = {link: 1e6 * statistics.median(s) for link, s in round_trips.items()}
    latency_mean_us = {link: 1e6 * statistics.fmean(s) for link, s in round_trips.items()}

    cfg = bench_config(model=model, batch_size=batch, stages=3, method="sgr")
    data = bench_data(cfg)
    x, y = next(train_batches(data, 0, cfg.batch_size, cfg.seed, False))
    step_s = min(stage_step_seconds(build_steps(cfg, data), x, y, reps=3))
    big = [r["shm_vs_memcpy"] for r in rows if r["bytes"] >= 4 * MB]
    targets = {
        "shm_vs_memcpy_at_4MB_up": {"min": SHM_MIN_VS_MEMCPY, "worst": min(big) if big else None,
                                    "met": bool(big) and min(big) >= SHM_MIN_VS_MEMCPY},
        "shm_latency_us": {"max": MAX_LATENCY_US, "measured": latency_us["shm"],
                           "met": latency_us["shm"] <= MAX_LATENCY_US},
        "latency_vs_stage_step": {"max": 0.05, "stage_step_ms": 1000 * step_s, "stage": f"{model} K=3 SGR, batch {batch}",
                                  "ratio": latency_us["shm"] / 1e6 / step_s,
                                  "met": latency_us["shm"] / 1e6 / step_s < 0.05},
    }
    results = {"meta": meta(args), "rows": rows, "latency_us": latency_us, "latency_mean_us": latency_mean_us,
               "targets": targets,
               "note": None if torch.cuda.is_available() else "no CUDA on this machine: cuda_ipc not measured"}
    write_results(args.out, results)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [("memcpy_GBps", "memcpy (torch copy_)"), ("ipc_GBps", "zmq ipc://"), ("tcp_GBps", "zmq tcp://"),
                       ("shm_GBps", "shared memory"), ("cuda_ipc_GBps", "CUDA IPC")]:
        if rows[0][key] is not None:
            ax.plot([r["bytes"] / MB for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="tensor size (MB)", ylabel="GB/s", title="Transport bandwidth")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(args.out) / "transport.png", dpi=120)

    def gbps(v: float | None) -> float | str:
        return "n/a (no CUDA)" if v is None else v

    lat, shm = targets["latency_vs_stage_step"], targets["shm_vs_memcpy_at_4MB_up"]
    print(f"{args.threads} torch thread(s); tiny message ({TINY} B) round trip with its credit (µs; the bare "
          "ping-pongs are the floors: zmq alone, a Unix socket alone)")
    names = {"ipc": "zmq ipc", "tcp": "zmq tcp", "shm": "shared memory (header on a Unix socket)",
             "cuda_ipc": "CUDA IPC", "bare_zmq": "bare pyzmq PAIR over ipc", "bare_unix": "bare Unix seqpacket"}
    print(markdown_table(["link", "median µs", "mean µs"],
                         [[names[link], latency_us[link], latency_mean_us[link]] for link in latency_us]))
    print(f"shared memory: median round trip <= {MAX_LATENCY_US:.0f} µs "
          f"({'met' if targets['shm_latency_us']['met'] else 'missed'}), = {100 * lat['ratio']:.2f}% of the shortest "
          f"stage step, {lat['stage_step_ms']:.0f} ms ({lat['stage']}, {args.threads} thread(s)); at 4 MB and up >= "
          f"{SHM_MIN_VS_MEMCPY} x memcpy ({'met' if shm['met'] else 'missed'}, worst {shm['worst']:.2f})")
    print(markdown_table(["size", "memcpy GB/s", "zmq ipc GB/s", "zmq tcp GB/s", "shm GB/s", "CUDA IPC GB/s",
                          "ipc / memcpy", "shm / memcpy"],
                         [[f"{r['bytes'] // KB} KB" if r["bytes"] < MB else f"{r['bytes'] // MB} MB", r["memcpy_GBps"],
                           r["ipc_GBps"], r["tcp_GBps"], r["shm_GBps"], gbps(r["cuda_ipc_GBps"]), r["ipc_vs_memcpy"],
                           r["shm_vs_memcpy"]] for r in rows]))
    return results


if __name__ == "__main__":
    main()
