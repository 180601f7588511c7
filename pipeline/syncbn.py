"""BatchNorm written in plain tensor ops, alone or over a process group (training statistics summed over the
replicas of a stage).

Layers, so they live with the models; the process group comes from workers/replicas.py, or from
`single_process_group` when the planner measures what a replicated stage keeps for backward.
"""
from __future__ import annotations

import contextlib
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.nn  # noqa: F401  before any group exists: see init_process_group
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

Guard = Callable[[], ContextManager[object]]  # what each all-reduce runs inside


class PlainBatchNorm(_BatchNorm):
    """BatchNorm whose training pass is plain tensor ops (sums, products), so its double backward is theirs.

    SGR differentiates δ, which passes through every BatchNorm of a module. On a GPU the double backward of
    BatchNorm1d's fused kernel differs from run to run (measured on an H200 with deterministic algorithms on: the
    gradients of a projector head differed in every bit-compare; torch does not flag it), so the layers that
    normalise (N, C) features use this one (projector heads, the MLP's DenseLayer). Plain ops repeated to the bit
    there; this class's own GPU test has not run yet. It keeps more for backward than the fused kernel (the input
    in fp32, centred and normalised). Same parameters, buffers and running-statistics update as BatchNorm;
    evaluation uses the running statistics, as BatchNorm does. Statistics in fp32 (fp64 for fp64 inputs).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {x.dim()}")

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """A per-channel sum of this process's rows, as the statistics need it (SyncBatchNorm: over the group)."""
        return t

    def processes(self) -> int:
        """How many processes' rows the statistics cover (SyncBatchNorm: the group's, each with as many rows)."""
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        rows = x.numel() // x.shape[1]
        if rows * self.processes() <= 1:  # as BatchNorm refuses it: the variance of one value is no statistic
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = xf.new_full((1,), float(rows))  # filled on the device: torch.tensor([..]) syncs
        sums = self.total(torch.cat([xf.sum(dims), count]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)
        var = self.total(centred.square().sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var.dtype), factor)
        return out.to(x.dtype)


class SyncBatchNorm(PlainBatchNorm):
    """BatchNorm whose training statistics cover the stage's whole batch, summed over its replicas.

    Written with differentiable all-reduces (_AllSum), so it has a double backward: torch.nn.SyncBatchNorm's
    fused backward has none. Each all-reduce, forward or backward, runs inside `guard()`: the stage's turns a
    failed one (a replica gone) into the error it reports.
    """

    def __init__(self, bn: _BatchNorm, group: dist.ProcessGroup | None, guard: Guard = contextlib.nullcontext) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        # the group by name (None: the default group, looked up when the layer runs), so that neither this layer nor
        # a graph it made keeps the group alive after destroy_process_group: a traceback may hold both, and a group
        # that outlives it is torn down at interpreter exit, which can abort the process (names are reused by the
        # groups of a later world in the same process: a layer belongs to the world it was made in)
        self.group_name = None if group is None else group.group_name
        self.size = None if group is None else dist.get_world_size(group)
        self.guard = guard
        # the same parameter and buffer objects: the optimizer built on `bn` trains these; the state_dict keys stay
        self.weight, self.bias = bn.weight, bn.bias
        self.running_mean, self.running_var = bn.running_mean, bn.running_var
        self.num_batches_tracked = bn.num_batches_tracked

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return _AllSum.apply(t, self.group_name or dist.group.WORLD.group_name, self.guard)

    def processes(self) -> int:
        return self.size or dist.get_world_size()


class _AllSum(torch.autograd.Function):
    """The sum of a tensor over the group's processes. Its backward is the same sum of the gradients, itself an
    _AllSum, so a double backward works; every all-reduce runs inside `guard()`."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group_name: str, guard: Guard) -> torch.Tensor:
        ctx.group_name, ctx.guard = group_name, guard
        with guard():
            return funcol.wait_tensor(funcol.all_reduce(t, "sum", group_name))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _AllSum.apply(grad, ctx.group_name, ctx.guard), None, None


def convert_sync_bn(module: nn.Module, group: dist.ProcessGroup | None,
                    guard: Guard = contextlib.nullcontext) -> nn.Module:
    """`module` with every BatchNorm replaced by a SyncBatchNorm over `group` (same parameters and buffers), its
    all-reduces run inside `guard()`."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        return SyncBatchNorm(module, group, guard)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_bn(child, group, guard))
    return module



def init_process_group(backend: str, **options: Any) -> None:
    """`dist.init_process_group`, the way every run's default group starts (this module imported torch.distributed.nn).

    torch.distributed.nn binds the default group as default arguments when first imported, and torch imports it
    lazily (torch._dynamo, which building the first optimizer imports). Imported after the group started, it kept the
    group alive after `destroy_process_group`, its gloo threads running until interpreter exit, where their teardown
    aborted a process now and then ("terminate called without an active exception", 2 runs in 100 of a replica
    test here)."""
    dist.init_process_group(backend, **options)


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A gloo group of this process alone while the block runs (unless one exists): SyncBatchNorm then runs as it
    does in a replicated stage, so the planner measures its bytes."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="sgr-plan-") as folder:
        init_process_group("gloo", store=dist.FileStore(str(Path(folder) / "store"), 1), rank=0, world_size=1,
                           timeout=timedelta(seconds=60))
        try:
            yield
        finally:
            dist.destroy_process_group()
