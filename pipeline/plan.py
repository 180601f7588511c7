"""The memory-balanced split (`split: auto`): measure every candidate module, then choose the cuts.

A candidate module is any range of units a..b-1 in the place it would hold in a split: SGR
and a local head unless it comes first, the network's classifier if it comes last. Its
training memory is measured by one real StageStep.train_step: the bytes autograd saves for
backward (SGR's double-backward graph included), counted over unique storages with
torch.autograd.graph.saved_tensors_hooks, plus parameter, gradient and optimizer-state
bytes. The pass runs at two small batches, b and b + 1: saved bytes are a fixed part (under
bf16 autocast, the weights' bf16 copies) plus a part in proportion to the batch, so the two
give both and extrapolate exactly to the training batch; the rest does not depend on it. The
cuts that minimise the largest module then come from a dynamic programme over that table
(`balanced_cuts`, pure).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from pipeline.config import Config, ConfigError, views_per_image
from pipeline.models import Network
from pipeline.splits import module_ranges
from pipeline.stages import (build_net, build_stage_step, check_layout, configure_torch, local_module, module_cuts,
                             unit_outputs, wire_dtype)
from pipeline.step import StageStep, StepOutput
from pipeline.syncbn import convert_sync_bn, single_process_group


@dataclass(frozen=True)
class ModuleMemory:
    """Bytes one module keeps for a training step: saved for backward, parameters, gradients, optimizer state."""

    saved: int
    params: int
    grads: int
    optimizer: int
    cuda_peak: int | None = None  # on a GPU: torch.cuda.max_memory_allocated during the step, above what was there before

    @property
    def total(self) -> int:
        return self.saved + self.params + self.grads + self.optimizer

    def at_batch(self, batch: int, measured_batch: int, other: ModuleMemory, other_batch: int) -> ModuleMemory:
        """The same module at `batch`, from this measurement and `other` at another batch: saved bytes are linear in it."""
        per_sample = (other.saved - self.saved) / (other_batch - measured_batch)
        return dataclasses.replace(self, saved=round(self.saved + per_sample * (batch - measured_batch)), cuda_peak=None)


@dataclass
class Plan:
    """A split chosen by measurement: cut points, every candidate module's memory and step time, and each chosen
    module's step time measured again."""

    cuts: list[int]
    seconds: list[float]  # median train_step seconds of each chosen module at the profiling batch
    batch_size: int
    profile_batch: int
    measured: dict[tuple[int, int], ModuleMemory]  # every candidate module (units a..b-1) at the profiling batch b
    table: dict[tuple[int, int], ModuleMemory]  # the same at the training batch: what the cuts were chosen on
    measured_next: dict[tuple[int, int], ModuleMemory]  # the same at batch b + 1 (with `measured`: any batch)
    step_seconds: dict[tuple[int, int], float]  # every candidate's step time, at batch b + 1 scaled to the training batch

    @property
    def n_units(self) -> int:
        return max(b for _, b in self.table)

    @property
    def units(self) -> list[range]:
        """The unit range of each chosen module."""
        return module_ranges(self.cuts, self.n_units)

    @property
    def memory(self) -> list[ModuleMemory]:
        """Each chosen module's memory at the training batch."""
        return [self.table[(r.start, r.stop)] for r in self.units]

    @property
    def global_bp(self) -> ModuleMemory:
        """The whole network as one module: global BP's memory at the training batch."""
        return self.table[(0, self.n_units)]

    @property
    def largest(self) -> int:
        """The largest chosen module's bytes at the training batch: what the cuts minimise."""
        return max(m.total for m in self.memory)

    def memory_at(self, a: int, b: int, batch: float) -> ModuleMemory:
        """Units a..b-1's memory as a module training on `batch` rows (a replica's shard, say)."""
        first, second = self.measured[(a, b)], self.measured_next[(a, b)]
        return first.at_batch(round(batch), self.profile_batch, second, self.profile_batch + 1)

    def layout(self, stages: int, gpus: int, cap: float, cuts: list[int] | None = None,
               bus_bytes_per_second: float = 0.0) -> Layout | None:
        """The fastest cuts (or these `cuts`) and replica counts on `gpus` devices of `cap` bytes each; replicas
        all-reduce their module's gradient bytes at `bus_bytes_per_second` (0: the all-reduce is left out)."""
        return best_layout(self.step_seconds, lambda a, b, c: self.memory_at(a, b, self.batch_size / c).total <= cap,
                           self.n_units, stages, gpus, self.batch_size, cuts,
                           lambda a, b, c: allreduce_seconds(self.measured[(a, b)].grads, c, bus_bytes_per_second))


def saved_bytes(fn: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of the unique storages autograd saves for backward while fn runs (storages in `exclude` left out)."""
    kept: dict[int, int] = {}  # storage address -> bytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Only addresses are kept, not the storages: holding them would keep every saved tensor alive to the end
        # of the step and overstate a CUDA peak measured around it. No address is reused among saved storages: a
        # local step saves everything before its one final backward frees it (the δ and SGR grads retain the graph).
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude and storage.nbytes():
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def step_memory(step: StageStep, x: torch.Tensor, delta: torch.Tensor | None, y: torch.Tensor,
                image: torch.Tensor | None = None) -> tuple[ModuleMemory, StepOutput]:
    """The memory of one real train_step of a module, and the step's output. InfoPro: with the uint8 input `image` it
    reconstructs; its bytes, which the stage receives and holds beside its input, count as saved."""
    params = [*step.module.parameters(), *step.head.parameters()]
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
    outputs = []
    saved = saved_bytes(lambda: outputs.append(step.train_step(x, delta, y, image)),
                        {p.untyped_storage().data_ptr() for p in params})
    memory = ModuleMemory(
        saved=saved + (0 if image is None else image.numel() * image.element_size()),
        params=sum(p.numel() * p.element_size() for p in params),
        grads=sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        optimizer=sum(v.numel() * v.element_size() for s in step.optimizer.state.values()
                      for v in s.values() if torch.is_tensor(v)),
        cuda_peak=torch.cuda.max_memory_allocated(x.device) - before if x.is_cuda else None,
    )
    return memory, outputs[0]


def median_seconds(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall time of fn over `reps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def balanced_cuts(costs: dict[tuple[int, int], int], n: int, k: int) -> tuple[list[int], int]:
    """Cut points into k modules that minimise the largest module's cost; costs[(a, b)] is units a..b-1's.

    Dynamic programming over (modules used, units covered); ties go to the earliest cuts.
    """
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} units into {k} modules")
    best = {(1, b): (costs[(0, b)], []) for b in range(1, n + 1)}  # (modules, units covered) -> (largest, cuts)
    for m in range(2, k + 1):
        for b in range(m, n + 1):
            best[(m, b)] = min((max(best[(m - 1, a)][0], costs[(a, b)]), best[(m - 1, a)][1] + [a])
                               for a in range(m - 1, b))
    largest, cuts = best[(k, n)]
    return cuts, largest


def allreduce_seconds(grad_bytes: int, count: int, bus_bytes_per_second: float) -> float:
    """Seconds a ring all-reduce of `grad_bytes` over `count` replicas takes at this bus bandwidth (each replica sends
    and receives 2(c-1)/c of the bytes); 0 for one replica, or where the bandwidth is not known (0)."""
    if count == 1 or bus_bytes_per_second <= 0:
        return 0.0
    return 2 * (count - 1) / count * grad_bytes / bus_bytes_per_second


@dataclass(frozen=True)
class Layout:
    """Cuts and replica counts, with the predicted throughput: min over stages of 1 / (a replica's step seconds +
    its gradient all-reduce's)."""

    cuts: list[int]
    counts: list[int]
    seconds: list[float]  # each stage's step seconds for a whole batch on one device
    rate: float  # predicted batches per second
    sync: list[float]  # each stage's gradient all-reduce seconds per step at its count (0: one replica, or left out)

    @property
    def step_seconds(self) -> list[float]:
        """Each stage's predicted seconds per batch: a replica's share of the step, then the all-reduce."""
        return [t / c + s for c, t, s in zip(self.counts, self.seconds, self.sync)]

    @property
    def busy(self) -> list[float]:
        """Each stage's predicted busy fraction: the pipeline's rate over the stage's own."""
        return [self.rate * t for t in self.step_seconds]


def best_layout(seconds: dict[tuple[int, int], float], fits: Callable[[int, int, int], bool], n: int, k: int,
                gpus: int, batch: int, cuts: list[int] | None = None,
                sync: Callable[[int, int, int], float] | None = None) -> Layout | None:
    """The cuts into k modules and replica counts (summing to at most `gpus`) that maximise predicted throughput.

    seconds[(a, b)]: units a..b-1's step time as one module on one device for a whole batch; c replicas take
    seconds / c each, plus sync(a, b, c), their gradient all-reduce (None: left out, ideal data parallelism; it
    follows the backward, which it does not overlap). fits(a, b, c): whether a replica of
    that module with c replicas fits the memory cap. Counts divide `batch` (equal shards of at least 2 rows, for
    BatchNorm). With `cuts`, only the
    counts are chosen. Ties go to more GPUs (less memory each). Dynamic programming over (modules, units covered,
    GPUs used); None if nothing fits.
    """
    counts_ok = [c for c in range(1, gpus + 1) if batch % c == 0 and batch // c >= 2]
    sync = sync or (lambda a, b, c: 0.0)

    def rate_of(a: int, b: int, c: int) -> float:  # batches per second of units a..b-1 on c replicas
        return 1 / (seconds[(a, b)] / c + sync(a, b, c))

    def ends(m: int) -> list[int]:  # where module m (1-based) may end
        return list(range(m, n + 1)) if cuts is None else [(list(cuts) + [n])[m - 1]]

    best: dict[tuple[int, int, int], tuple[float, list[int], list[int]]] = {}  # (m, b, g) -> (rate, cuts, counts)
    for b in ends(1):
        for c in counts_ok:
            if fits(0, b, c):
                best[(1, b, c)] = (rate_of(0, b, c), [], [c])
    for m in range(2, k + 1):
        for b in ends(m):
            for (m0, a, g), (rate, cut, counts) in list(best.items()):
                if m0 != m - 1 or a >= b:
                    continue
                for c in counts_ok:
                    if g + c > gpus or not fits(a, b, c):
                        continue
                    candidate = (min(rate, rate_of(a, b, c)), cut + [a], counts + [c])
                    key = (m, b, g + c)
                    if key not in best or candidate[0] > best[key][0]:
                        best[key] = candidate
    finals = [(rate, g, cut, counts) for (m, b, g), (rate, cut, counts) in best.items() if m == k and b == n]
    if not finals:
        return None
    rate, _, cut, counts = max(finals, key=lambda f: (f[0], f[1]))
    ranges = module_ranges(cut, n)
    return Layout(cut, counts, [seconds[(r.start, r.stop)] for r in ranges], rate,
                  [sync(r.start, r.stop, c) for r, c in zip(ranges, counts)])


class Profiler:
    """Builds and measures any range of a network's units as the module it would be in a split.

    Every candidate shares the network's units; the optimizers run at learning rate 0 so the
    weights stay as built (the bytes do not depend on them anyway). With `sync_bn`, every
    BatchNorm runs as the SyncBatchNorm of a replicated stage (which keeps more for backward), in
    the process group the caller holds (`syncbn.single_process_group`).
    """

    def __init__(self, cfg: Config, net: Network, in_channels: int, num_classes: int, input_size: int, batch: int,
                 sync_bn: bool = False) -> None:
        """`batch`: the largest batch it will measure at (smaller ones take the first samples); a batch of b images is
        b rows, or 2b with Barlow Twins' two views."""
        self.cfg, self.sync_bn = dataclasses.replace(cfg, lr=0.0), sync_bn
        self.views = views_per_image(cfg)
        batch *= self.views
        if sync_bn:
            for unit in net.units:
                convert_sync_bn(unit, None)
        self.net, self.in_channels, self.num_classes, self.n = net, in_channels, num_classes, len(net.units)
        self.device = torch.device(cfg.device)
        configure_torch(cfg, self.device)  # the kernels the run will use (TF32 or not, deterministic or not)
        self.outputs = unit_outputs(net, in_channels, input_size)
        for unit in net.units:
            unit.to(self.device)
        net.classifier.to(self.device)
        g = torch.Generator().manual_seed(cfg.seed)
        self.y = torch.randint(0, num_classes, (batch,), generator=g).to(self.device)
        self.inputs = [torch.randn(batch, in_channels, input_size, input_size, generator=g).to(self.device)]
        self.image = torch.randint(0, 256, (batch, in_channels, input_size, input_size), generator=g,
                                   dtype=torch.uint8).to(self.device)  # what InfoPro's decoders reconstruct
        with torch.no_grad():  # each unit's input (eval mode: per sample), so a candidate starting at unit a gets a real one
            for unit in net.units[:-1]:
                self.inputs.append(unit(self.inputs[-1]))

    def step(self, a: int, b: int) -> tuple[StageStep, bool]:
        """The StageStep of units a..b-1 in their place, and whether it receives a δ (zeros are measured)."""
        k = 0 if a == 0 else 1
        k_total = k + 1 + (b < self.n)
        lm = local_module(self.cfg, self.net, range(a, b), self.outputs[b - 1], self.num_classes, k, b == self.n,
                          self.in_channels)
        if self.sync_bn:
            convert_sync_bn(lm.head, None)
        lm.head.to(self.device)
        step = build_stage_step(self.cfg, lm, k, k_total, steps_per_epoch=1)
        return step, step.needs_delta

    def batch(self, a: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit a's input, as the previous module would send it, and the labels for the first `batch` samples, in
        storages of their own (a kept view would count the whole batch's storage)."""
        rows = batch * self.views
        x = self.inputs[a][:rows].clone()
        return (x if a == 0 else x.to(wire_dtype(self.cfg))), self.y[:rows].clone()  # later modules get the wire dtype

    def profile(self, a: int, b: int, batch: int) -> tuple[ModuleMemory, float]:
        """Measured memory of units a..b-1 as a module, at `batch`, and the seconds that step took."""
        step, needs_delta = self.step(a, b)
        x, y = self.batch(a, batch)
        start = time.perf_counter()
        image = self.image[:batch] if step.needs_image else None
        memory = step_memory(step, x, torch.zeros_like(x) if needs_delta else None, y, image)[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return memory, time.perf_counter() - start

    def seconds(self, a: int, b: int, batch: int, reps: int = 3) -> float:
        """Median train_step seconds of units a..b-1 as a module, at `batch`."""
        step, needs_delta = self.step(a, b)
        x, y = self.batch(a, batch)
        delta = torch.zeros_like(x) if needs_delta else None
        image = self.image[:batch] if step.needs_image else None

        def one_step() -> None:
            step.train_step(x, delta, y, image)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return median_seconds(one_step, reps)


@contextlib.contextmanager
def seeded_network(cfg: Config, in_channels: int, num_classes: int, input_size: int,
                   sync_bn: bool) -> Iterator[Network]:
    """The config's network built from its seed, without touching the global RNG; with `sync_bn`, inside a
    one-process group so its BatchNorm can be measured as replicated stages run it."""
    with torch.random.fork_rng(devices=[]), single_process_group() if sync_bn else contextlib.nullcontext():
        torch.manual_seed(cfg.seed)
        net = build_net(cfg, in_channels, num_classes, input_size)
        check_layout(cfg, net)
        yield net


def measure(profiler: Profiler, ranges: list[tuple[int, int]], batch: int, batch_size: int
            ) -> tuple[dict[tuple[int, int], ModuleMemory], dict[tuple[int, int], ModuleMemory], dict[tuple[int, int], float]]:
    """Each range's memory at `batch` and at `batch + 1`, and its step time: the batch + 1 step (the second of its
    units: warmer to time) scaled in proportion to `batch_size`."""
    first = {r: profiler.profile(*r, batch)[0] for r in ranges}
    second = {r: profiler.profile(*r, batch + 1) for r in ranges}
    return (first, {r: memory for r, (memory, _) in second.items()},
            {r: seconds * batch_size / (batch + 1) for r, (_, seconds) in second.items()})


def plan_split(cfg: Config, in_channels: int, num_classes: int, input_size: int, sync_bn: bool = False) -> Plan:
    """The split of the config's network into cfg.stages modules whose largest needs the least memory at cfg.batch_size
    (with `sync_bn`, BatchNorm measured as replicated stages run it: for planning replicas)."""
    with seeded_network(cfg, in_channels, num_classes, input_size, sync_bn) as net:
        return plan_network(cfg, net, in_channels, num_classes, input_size, sync_bn)


def plan_network(cfg: Config, net: Network, in_channels: int, num_classes: int, input_size: int,
                 sync_bn: bool = False) -> Plan:
    """Measure every candidate module of `net` at two small batches, then choose the least-memory cuts for cfg.stages."""
    n = len(net.units)
    if not 1 <= cfg.stages <= n:
        raise ConfigError(f"stages={cfg.stages} is out of range: model {cfg.model} has {n} units, so use 1..{n}")
    batch = min(cfg.profile_batch, cfg.batch_size)
    exact = batch == cfg.batch_size  # measured at the training batch: nothing to extrapolate
    profiler = Profiler(cfg, net, in_channels, num_classes, input_size, batch + 1, sync_bn)
    ranges_all = [(a, b) for a in range(n) for b in range(a + 1, n + 1)]
    measured, measured_next, step_seconds = measure(profiler, ranges_all, batch, cfg.batch_size)
    table = measured if exact else {
        r: measured[r].at_batch(cfg.batch_size, batch, measured_next[r], batch + 1) for r in ranges_all}
    cuts, _ = balanced_cuts({r: m.total for r, m in table.items()}, n, cfg.stages)
    seconds = [profiler.seconds(r.start, r.stop, batch) for r in module_ranges(cuts, n)]
    return Plan(cuts, seconds, cfg.batch_size, batch, measured, table, measured_next, step_seconds)


def plan_replicas(cfg: Config, in_channels: int, num_classes: int, input_size: int, gpus: int,
                  cap: float | None = None) -> Layout | None:
    """`replicas: auto`: counts for the config's modules (its split as it is) on `gpus` devices of `cap` bytes
    (default: the device's memory, none on the CPU). Only those modules are measured, as `split: auto` measures
    its candidates (BatchNorm as the run will use it: SyncBatchNorm with `sync_bn`, which keeps more for backward;
    so a stage left at one replica is overestimated), and `Plan.layout` picks the counts."""
    with seeded_network(cfg, in_channels, num_classes, input_size, cfg.sync_bn) as net:
        cuts, n = module_cuts(cfg, net), len(net.units)
        batch = min(cfg.profile_batch, cfg.batch_size)
        profiler = Profiler(cfg, net, in_channels, num_classes, input_size, batch + 1, cfg.sync_bn)
        ranges = [(r.start, r.stop) for r in module_ranges(cuts, n)]
        measured, measured_next, step_seconds = measure(profiler, ranges, batch, cfg.batch_size)
    if cap is None:
        cap = torch.cuda.get_device_properties(profiler.device).total_memory if profiler.device.type == "cuda" else math.inf
    table = {r: measured[r].at_batch(cfg.batch_size, batch, measured_next[r], batch + 1) for r in ranges}
    plan = Plan(cuts, [], cfg.batch_size, batch, measured, table, measured_next, step_seconds)  # these modules only
    return plan.layout(len(ranges), gpus, cap, cuts, cfg.allreduce_gbps * 1e9)


def resolve_auto_split(cfg: Config, in_channels: int, num_classes: int, input_size: int) -> tuple[Config, Plan | None]:
    """The config with `split: auto` replaced by the planned cut points (and the plan); other configs as they are."""
    if cfg.split != "auto" or cfg.method == "bp":
        return cfg, None
    plan = plan_split(cfg, in_channels, num_classes, input_size)
    return dataclasses.replace(cfg, split=plan.cuts), plan
