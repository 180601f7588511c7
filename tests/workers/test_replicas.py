"""A stage's replicas (gloo on the CPU): their averaged SGR steps equal one process's step on the whole batch."""
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pipeline.step import StageStep
from pipeline.syncbn import convert_sync_bn, init_process_group
from tests.pipeline.test_syncbn import gloo_threads
from workers.replicas import ReplicaGroup, ReplicasDiverged, buckets, digest, group_backend, join_group
from workers.transport import PeerLost
from workers.routes import shard

TOLERANCE = dict(rtol=1e-4, atol=1e-6)  # float32 sums in another order; measured differences are ~1e-7


def test_group_backend_is_nccl_only_between_distinct_gpus():
    assert group_backend(["cuda:0", "cuda:1"]) == "nccl"
    assert group_backend(["cuda:0", "cuda:0"]) == "gloo"  # NCCL refuses two ranks on one GPU
    assert group_backend([None, None]) == "gloo"
    assert group_backend(["GPU-1a", None]) == "gloo"


def test_buckets_keep_dtype_and_size():
    a, b, c = torch.zeros(4), torch.zeros(4), torch.zeros(2, dtype=torch.float64)
    assert [[t.shape for t in bucket] for bucket in buckets([a, b, c], limit=32)] == [[a.shape, b.shape], [c.shape]]
    assert len(buckets([a, b], limit=16)) == 2


def test_digest_sees_one_bit():
    w = torch.randn(10)
    flipped = w.clone()
    flipped.view(torch.int32)[3] ^= 1
    assert digest([w]) == digest([w.clone()]) and digest([w]) != digest([flipped])


def tiny_step(seed: int = 0) -> tuple[StageStep, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Module 2 of an SGR run: conv + BatchNorm, a head with BatchNorm, and a batch of 8 with its δ."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    params = [*module.parameters(), *head.parameters()]
    step = StageStep(module, head, torch.optim.SGD(params, lr=0.1, momentum=0.9), lam=2.0, is_first=False,
                     is_last=False, send_delta=True)
    x, delta, y = torch.randn(8, 3, 5, 5), torch.randn(8, 3, 5, 5), torch.randint(0, 3, (8,))
    return step, x, delta, y


def state(step: StageStep) -> dict[str, torch.Tensor]:
    return {**{f"module.{k}": v for k, v in step.module.state_dict().items()},
            **{f"head.{k}": v for k, v in step.head.state_dict().items()}}


def _replica(rank: int, size: int, store: str, out: str, sync_bn: bool, diverge: bool) -> None:
    torch.set_num_threads(1)
    group = join_group(store, rank, size, "gloo", 60, torch.device("cpu"))
    step, x, delta, y = tiny_step()
    if sync_bn:
        convert_sync_bn(step.module, None)
        convert_sync_bn(step.head, None)
    step.average_gradients = group.average_gradients
    a, b = shard(len(x), size, rank)
    outputs = []
    for _ in range(3):
        result = step.train_step(x[a:b], delta[a:b], y[a:b])
        outputs.append((result.out, result.delta))
        if not sync_bn:
            group.broadcast_buffers([step.module, step.head])
    if diverge and rank == 1:
        with torch.no_grad():
            step.module[0].bias[0] += 1e-3
    try:
        group.check_same([step.module, step.head], "stage 2", 3)
        verdict = "same"
    except ReplicasDiverged as err:
        verdict = str(err)
    torch.save({"state": state(step), "outputs": outputs, "verdict": verdict}, f"{out}/{rank}.pt")
    group.finish()
    dist.destroy_process_group()
    assert not gloo_threads()  # the group ended here, not at interpreter exit (where its teardown can abort)


def run_replicas(tmp_path: Path, size: int, sync_bn: bool, diverge: bool = False) -> list[dict]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_replica, args=(r, size, str(tmp_path / "store"), str(tmp_path), sync_bn, diverge))
             for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(size)]


@pytest.mark.parametrize("size", [2, 4])
def test_replicas_with_sync_bn_equal_one_process_on_the_whole_batch(tmp_path, size):
    replicas = run_replicas(tmp_path, size, sync_bn=True)
    step, x, delta, y = tiny_step()
    outputs = [step.train_step(x, delta, y) for _ in range(3)]
    expected = state(step)
    for r, got in enumerate(replicas):
        assert got["verdict"] == "same"
        for name, value in expected.items():  # weights, BatchNorm running statistics, batch counts
            torch.testing.assert_close(got["state"][name], value, **TOLERANCE, msg=f"replica {r}: {name}")
        a, b = shard(len(x), size, r)
        for (out, sent_delta), result in zip(got["outputs"], outputs):  # what each replica sends on: its rows
            torch.testing.assert_close(out, result.out[a:b], **TOLERANCE)
            # δ of a shard's mean loss is `size` times the whole batch's mean loss's (SGR normalises it per sample)
            torch.testing.assert_close(sent_delta, size * result.delta[a:b], **TOLERANCE)
    for r in range(1, size):  # the replicas among themselves: the same bits
        assert all(torch.equal(replicas[r]["state"][n], replicas[0]["state"][n]) for n in expected)


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The reference of `sync_bn: false`: each of `shards` equal parts of the batch normalised by its own statistics;
    the running statistics follow the first part (replica 0's, which the replicas take after each step)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, shards: int) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.weight, self.bias, self.shards = bn.weight, bn.bias, shards
        self.running_mean, self.running_var, self.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked

    def _check_input_dim(self, x: torch.Tensor) -> None:
        """Any BatchNorm's input (1d, 2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        first, *rest = x.chunk(self.shards)
        return torch.cat([super().forward(first), *(F.batch_norm(part, None, None, self.weight, self.bias, training=True,
                                                                 eps=self.eps) for part in rest)])


def ghost(module: nn.Module, shards: int) -> None:
    """Replace every BatchNorm in `module` by a GhostBatchNorm over `shards` parts (same parameters and buffers)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, GhostBatchNorm(child, shards))
        else:
            ghost(child, shards)


def test_replicas_with_per_shard_batch_norm_equal_a_reference_that_normalises_per_shard(tmp_path):
    replicas = run_replicas(tmp_path, 2, sync_bn=False)
    step, x, delta, y = tiny_step()
    ghost(step.module, 2)
    ghost(step.head, 2)
    for _ in range(3):
        step.train_step(x, delta, y)
    for got in replicas:
        assert got["verdict"] == "same"
        for name, value in state(step).items():
            torch.testing.assert_close(got["state"][name], value, **TOLERANCE, msg=name)


def test_a_replica_with_other_weights_is_named(tmp_path):
    replicas = run_replicas(tmp_path, 2, sync_bn=True, diverge=True)
    for got in replicas:
        assert "stage 2: replica(s) [2] hold other weights than replica 1 after step 3" in got["verdict"]


def _torchrun_replica(rank: int, store: str, release: bool) -> None:
    """A replica as under torchrun (its group a new_group of the default one) whose stage, group and a graph through
    its SyncBatchNorm are still referenced after the run, as an error's traceback keeps them: gloo's threads must end
    with destroy_process_group all the same."""
    torch.set_num_threads(1)
    init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    group = ReplicaGroup(dist.new_group([0, 1]), 2, rank, torch.device("cpu"))
    step, x, delta, y = tiny_step()
    convert_sync_bn(step.module, group.group)
    step.average_gradients = group.average_gradients
    rows = slice(4 * rank, 4 * rank + 4)
    step.train_step(x[rows], delta[rows], y[rows])
    graph = step.module(x[rows])  # its SyncBatchNorm's all-reduces are nodes of this graph
    group.finish()
    if release:
        group.release()
    dist.destroy_process_group()
    assert bool(gloo_threads(wait_s=2.0 if release else 0.5)) is not release, (group, step, graph)  # still held


@pytest.mark.parametrize("release", [True, False])
def test_a_released_replica_group_ends_with_destroy_even_while_referenced(tmp_path, release):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_torchrun_replica, args=(r, str(tmp_path / "store"), release)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def test_a_released_group_refuses_collectives_instead_of_using_the_whole_world():
    group = ReplicaGroup(None, 2, 0, torch.device("cpu"))
    group.release()
    for call in (lambda: group.all_sum([1.0]), group.finish, lambda: group.broadcast_buffers([nn.BatchNorm1d(2)])):
        with pytest.raises(ValueError, match="released when its run ended"):
            call()


def test_a_failed_collective_is_a_lost_peer_so_the_launcher_blames_whoever_failed_first(monkeypatch):
    def reset(*args, **kwargs):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer.\nmore detail")

    for name in ("all_reduce", "barrier", "broadcast", "all_gather"):
        monkeypatch.setattr(dist, name, reset)
    group = ReplicaGroup(None, 2, 0, torch.device("cpu"))
    layer = nn.Linear(2, 2)
    layer.weight.grad, layer.bias.grad = torch.ones(2, 2), torch.ones(2)
    lost = r"a replica of this stage is gone or hung \(\[gloo/.*Connection reset by peer\.\)$"
    for call in (lambda: group.average_gradients(list(layer.parameters())), group.finish, lambda: group.all_sum([1.0]),
                 lambda: group.broadcast_buffers([nn.BatchNorm1d(2)]), lambda: group.check_same([layer], "stage 2", 5)):
        with pytest.raises(PeerLost, match=lost):
            call()
