"""Where each stage runs and how its tensors may travel: pure decisions, tested on the CPU.

Nothing here touches a GPU. The launcher asks the CUDA runtime for the facts (how many GPUs
this process sees, their UUIDs, bf16 support) and passes them in, so every rule about
placement, CUDA IPC and dtypes is a plain function of its arguments.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.config import ConfigError

# Tensors a stage forwards as it got them: labels, and InfoPro's uint8 input images. They travel as frames (a CUDA
# tensor received by IPC cannot be shared again) and stay on the host until a stage uses them.
HOST_TENSORS = frozenset({"y", "image"})
UNIX_SCHEME = "unix://"  # a link endpoint on a Unix seqpacket socket (workers/transport.UnixChannel)


TORCHRUN_FIX = "start the run with torchrun (which sets these variables), or unset WORLD_SIZE to let launch.py spawn it"


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started; size 1: not under torchrun (launch.py spawns)."""
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_size: int = 1


def torchrun_world(environ: Mapping[str, str]) -> World:
    """The world torchrun's variables describe. Only WORLD_SIZE > 1 means torchrun: a stray RANK alone is ignored.
    A malformed or inconsistent variable is a one-line ConfigError, before torch's rendezvous could wait on it."""
    def number(name: str, default: int | None = None) -> int | None:
        value = environ.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not an integer; {TORCHRUN_FIX}") from None

    size = number("WORLD_SIZE", 1)
    if size < 1:
        raise ConfigError(f"WORLD_SIZE={size} is not a number of processes; {TORCHRUN_FIX}")
    if size == 1:
        return World()
    rank = number("RANK")
    if rank is None or not 0 <= rank < size:
        raise ConfigError(f"WORLD_SIZE={size} needs a RANK from 0 to {size - 1}, got {rank}; {TORCHRUN_FIX}")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={size} without {' and '.join(missing)}; {TORCHRUN_FIX}")
    local_size, local_rank = number("LOCAL_WORLD_SIZE", size), number("LOCAL_RANK", 0)
    if not 1 <= local_size <= size or not 0 <= local_rank < local_size:
        raise ConfigError(f"LOCAL_RANK={local_rank} of LOCAL_WORLD_SIZE={local_size} does not fit WORLD_SIZE={size}; "
                          f"{TORCHRUN_FIX}")
    return World(size, rank, local_rank, local_size)


def stage_device(device: str, gpus: Sequence[int], stage: int, visible: int, local_rank: int | None = None) -> str:
    """The device of pipeline stage `stage` (0-based).

    device: the config's `cpu`, `cuda` or `cuda:N`; gpus: the config's per-stage GPU list (may
    be empty); visible: GPUs this process sees; local_rank: this process's rank on its node
    under torchrun with one process per stage (None when one launcher spawns every stage).
    `cuda:N` puts every stage on GPU N, as the sequential trainer does; `gpus` picks one per
    stage; plain `cuda` spreads the stages (by stage, or by local rank under torchrun) over the
    visible GPUs, so several stages may share one.
    """
    if not device.startswith("cuda"):
        return "cpu"
    if visible < 1:
        raise ConfigError(f"device {device} asked for but no CUDA GPU is visible; use --device cpu")
    if gpus:
        index = gpus[stage]
        if not 0 <= index < visible:
            raise ConfigError(f"gpus[{stage}] = {index} does not exist: this process sees {visible} GPU(s) "
                              f"(check CUDA_VISIBLE_DEVICES or the gpus list)")
        return f"cuda:{index}"
    if ":" in device:
        index = int(device.partition(":")[2])
        if index >= visible:
            raise ConfigError(f"device {device} does not exist: this process sees {visible} GPU(s); use cuda:0..{visible - 1}")
        return device
    slot = stage if local_rank is None else local_rank
    return f"cuda:{slot % visible}"


class LinkKind(str, Enum):
    """How a link's tensors travel; the header goes through the link's channel (`link_endpoint` picks it)."""

    ZMQ = "zmq"  # raw zmq frames: any two processes, on any hosts
    SHARED_MEMORY = "shm"  # written into the producer's shared-memory slots: two processes on one host
    CUDA_IPC = "cuda_ipc"  # a device-memory handle: the consumer opens the producer's GPU memory


@dataclass(frozen=True)
class LinkEnd:
    """Where one end of a link lives: its host, its GPU (UUID; None on the CPU) and the GPUs its process sees."""

    host: str
    gpu: str | None = None
    visible: tuple[str, ...] = ()


def link_kind(transport: str, producer: LinkEnd, consumer: LinkEnd) -> LinkKind:
    """The kind of the link from `producer` to `consumer`: the one decision about transports.

    On one host, CUDA IPC when the consumer's process sees the producer's GPU, else shared
    memory (a GPU producer stages through pinned host memory first); across hosts, zmq frames;
    `transport: zmq` forces zmq frames. GPUs are named by UUID: under torchrun each rank may see
    only its own GPU, so host names alone cannot tell whether a handle can be opened.
    """
    if transport == "zmq" or producer.host != consumer.host:
        return LinkKind.ZMQ
    if producer.gpu is not None and producer.gpu in consumer.visible:
        return LinkKind.CUDA_IPC
    return LinkKind.SHARED_MEMORY


def link_endpoint(kind: LinkKind, folder: str, name: str, host: str | None = None) -> str:
    """Where the consumer of a link of `kind` binds: a shared-memory link (one small header per message) on the Unix
    socket `folder/name`, which needs no zmq I/O thread; any other on zmq, at `ipc://folder/name` when one launcher
    spawned both ends (`host` None), else on tcp at `host` (a free port)."""
    if kind is LinkKind.SHARED_MEMORY:
        return f"{UNIX_SCHEME}{folder}/{name}"
    return f"ipc://{folder}/{name}" if host is None else f"tcp://{host}:*"


def host_id() -> str:
    """This machine's identity for `LinkEnd.host`: its host name and boot id (two hosts may share a name)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def ipc_device_index(gpu: str, visible: Sequence[str]) -> int:
    """The index under which this process opens a CUDA IPC handle of GPU `gpu` (a UUID): its place among the GPUs
    this process sees. The producer's own index may differ (ranks under torchrun may number the GPUs apart)."""
    if gpu not in visible:
        raise RuntimeError(f"a CUDA IPC handle of GPU {gpu} arrived, but this process sees only {list(visible)}; "
                           "run with --set transport=zmq")
    return list(visible).index(gpu)


def travels_by_ipc(name: str, is_cuda: bool, numel: int, link_ipc: bool) -> bool:
    """Whether one tensor of a message goes as a CUDA IPC handle (else as a raw frame through host memory).

    Only a stage's own outputs go by handle: labels are forwarded from stage to stage, and a CUDA
    tensor received by IPC cannot be shared again. An empty tensor has no memory to share.
    """
    return link_ipc and is_cuda and numel > 0 and name not in HOST_TENSORS


def sends_in_background(device_type: str) -> bool:
    """Whether a stage on this kind of device sends from its outbox's thread (workers/outbox.py), overlapping the copy
    into its links with its next step. A GPU stage sends inline: its CUDA IPC handles and device-to-host copies stay
    on the thread whose stream made the tensors (not yet measured on a GPU)."""
    return device_type == "cpu"
