"""The replicas of one stage: one torch.distributed process group that keeps them one model.

Every replica trains the same module on its own shard of each batch (workers/routes.py). After
each local backward (SGR's double backward included) the group averages the gradients, so every
replica takes the same optimizer step and holds the same weights; BatchNorm statistics are either
shared over the whole stage batch (`sync_bn: true`, pipeline/syncbn.py) or kept per shard with
replica 0's running statistics broadcast after each step (`false`, what DDP does). Every
`checksum_every` steps the replicas compare a digest of their weights.

Not DistributedDataParallel: its hooks assume one backward per forward, and an SGR step takes
two gradients before its backward (δ of its own loss, and δ's own gradient through the SGR term).
Averaging the finished gradients after the step's backward, in buckets, is correct for every method.
"""
from __future__ import annotations

import contextlib
import hashlib
from datetime import timedelta
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.syncbn import init_process_group
from workers.transport import PeerLost

BUCKET_BYTES = 32 * 2**20  # gradients are averaged in flat buckets of at most this size (one collective each)


class ReplicasDiverged(RuntimeError):
    """The replicas of a stage no longer hold the same weights."""


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """Around one collective: its failure (a replica died, or hung past the group's timeout) is a lost peer, so the
    launcher names the process that failed first, not the replicas it left in the collective."""
    try:
        yield
    except RuntimeError as err:
        raise PeerLost(f"a replica of this stage is gone or hung ({str(err).splitlines()[0][:200]})") from None


def group_backend(gpus: Sequence[str | None]) -> str:
    """The collective backend of a replica group, from each replica's GPU (its name or UUID; None on the CPU):
    NCCL between distinct GPUs, gloo on the CPU or where two replicas share a GPU (NCCL refuses two ranks
    of one communicator on one device)."""
    return "nccl" if None not in gpus and len(set(gpus)) == len(gpus) else "gloo"


def buckets(tensors: Iterable[torch.Tensor], limit: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device grouped into buckets of at most `limit` bytes (a bigger
    tensor is a bucket of its own)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = out[-1] if out else None
        if last is None or last[0].dtype != t.dtype or last[0].device != t.device or size + nbytes > limit:
            out.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return out


def in_buckets(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], object]) -> None:
    """Run `collective` in place on each bucket of the tensors, flattened into one, and copy the result back."""
    for bucket in buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        collective(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def digest(tensors: Iterable[torch.Tensor]) -> int:
    """A 63-bit digest of the tensors' exact bytes (names aside): equal weights give equal digests."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


class ReplicaGroup:
    """This process's view of its stage's replicas: `size` processes, this one `rank` among them."""

    def __init__(self, group: dist.ProcessGroup | None, size: int, rank: int, device: torch.device) -> None:
        self._group, self.size, self.rank, self.device = group, size, rank, device
        self.released = False

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The stage's process group (None: the default group, which is the stage's when spawned)."""
        if self.released:  # not None, which would mean the whole world under torchrun
            raise ValueError("this stage's replica group was released when its run ended; it takes no more collectives")
        return self._group

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Replace every gradient by its mean over the replicas (all-reduce of flat buckets)."""
        def mean(flat: torch.Tensor) -> None:
            with collective():
                dist.all_reduce(flat, group=self.group)
            flat.div_(self.size)

        in_buckets([p.grad for p in params if p.grad is not None], mean)  # the same parameters have one everywhere

    def finish(self) -> None:
        """Wait until every replica is done: none tears the group down while a peer is still in a collective."""
        with collective():
            dist.barrier(group=self.group)

    def all_sum(self, values: list[float | int | torch.Tensor]) -> list[float]:
        """The sums over the replicas of a few numbers (in float64, on this device)."""
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        with collective():
            dist.all_reduce(flat, group=self.group)
        return flat.tolist()

    def broadcast_buffers(self, modules: Iterable[nn.Module]) -> None:
        """Copy replica 0's buffers (BatchNorm's running statistics) to every replica, as DDP does (in buckets)."""
        def from_first(flat: torch.Tensor) -> None:
            with collective():
                dist.broadcast(flat, src=self._global(0), group=self.group)

        in_buckets([b for module in modules for b in module.buffers()], from_first)

    def check_same(self, modules: Iterable[nn.Module], what: str, step: int) -> None:
        """Stop the run, naming `what` and the step, if any replica's weights and buffers differ from replica 0's."""
        state = [t for module in modules for t in module.state_dict().values()]
        mine = torch.tensor([digest(state)], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.size)]
        with collective():
            dist.all_gather(every, mine, group=self.group)
        differ = [r + 1 for r, d in enumerate(every) if not torch.equal(d, every[0])]
        if differ:
            raise ReplicasDiverged(f"{what}: replica(s) {differ} hold other weights than replica 1 after step {step} "
                                   "(a fault in a collective or a non-deterministic kernel); resume from the last checkpoint")

    def release(self) -> None:
        """Drop the process group, when the stage closes (collectives afterwards raise): `destroy_process_group` then
        frees it even while a traceback keeps this object alive, where a group that outlived it would be torn down
        at interpreter exit, which can abort the process (SyncBatchNorm layers hold the group by name only)."""
        self._group, self.released = None, True

    def _global(self, rank: int) -> int:
        """The rank in the default group of this group's `rank` (the two differ under torchrun)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


def join_group(store_path: str, rank: int, size: int, backend: str, timeout_s: float,
               device: torch.device) -> ReplicaGroup:
    """Join the replica group of a spawned run: every replica of the stage names the same file store."""
    store = dist.FileStore(store_path, size)
    init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s),
                       device_id=device if backend == "nccl" else None)
    return ReplicaGroup(None, size, rank, device)

