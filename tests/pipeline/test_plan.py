"""The memory-balanced split: the search is exact, the profiled modules are the real stages, known profiles give known cuts."""
import dataclasses
import itertools
import random

import pytest
import torch
import torch.nn as nn

from pipeline.config import Config, ConfigError, validate
from pipeline.models import Network, PoolLinear
from pipeline.plan import (ModuleMemory, Profiler, allreduce_seconds, balanced_cuts, best_layout, plan_network,
                           plan_split, resolve_auto_split, saved_bytes, seeded_network, step_memory)
from pipeline.splits import SplitError, module_ranges, resolve_cuts
from pipeline.stages import build_local_modules, build_stage_steps


def brute_force(costs, n, k):
    """The least largest module over every way to cut n units into k modules."""
    return min(max(costs[(r.start, r.stop)] for r in module_ranges(list(cuts), n))
               for cuts in itertools.combinations(range(1, n), k - 1))


@pytest.mark.parametrize("seed", range(20))
def test_balanced_cuts_find_the_least_largest_module(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    costs = {(a, b): rng.randint(0, 50) for a in range(n) for b in range(a + 1, n + 1)}
    for k in range(1, n + 1):
        cuts, largest = balanced_cuts(costs, n, k)
        assert len(cuts) == k - 1 and cuts == sorted(set(cuts)) and all(0 < c < n for c in cuts)
        assert largest == max(costs[(r.start, r.stop)] for r in module_ranges(cuts, n))
        assert largest == brute_force(costs, n, k)


def test_balanced_cuts_split_additive_costs_evenly():
    unit = [5, 1, 1, 1, 1, 5]
    costs = {(a, b): sum(unit[a:b]) for a in range(6) for b in range(a + 1, 7)}
    assert balanced_cuts(costs, 6, 2) == ([3], 7)
    assert balanced_cuts(costs, 6, 3) == ([1, 5], 5)
    with pytest.raises(ValueError, match="cannot cut 6 units into 7 modules"):
        balanced_cuts(costs, 6, 7)


def layout_brute_force(seconds, fits, n, k, gpus, batch, sync=lambda a, b, c: 0.0):
    """The best predicted rate over every cut and every assignment of counts that divide the batch."""
    best = 0.0
    counts_ok = [c for c in range(1, gpus + 1) if batch % c == 0 and batch // c >= 2]
    for cuts in itertools.combinations(range(1, n), k - 1):
        ranges = module_ranges(list(cuts), n)
        for counts in itertools.product(counts_ok, repeat=k):
            if sum(counts) <= gpus and all(fits(r.start, r.stop, c) for r, c in zip(ranges, counts)):
                best = max(best, min(1 / (seconds[(r.start, r.stop)] / c + sync(r.start, r.stop, c))
                                     for r, c in zip(ranges, counts)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_best_layout_finds_the_fastest_cuts_and_counts_that_fit(seed):
    rng = random.Random(seed)
    n, gpus, batch = rng.randint(2, 6), rng.randint(2, 8), rng.choice([8, 12, 30])
    unit = [rng.uniform(1, 10) for _ in range(n)]
    seconds = {(a, b): sum(unit[a:b]) for a in range(n) for b in range(a + 1, n + 1)}
    cap = rng.uniform(5, 30)
    fits = lambda a, b, c: sum(unit[a:b]) / c <= cap  # noqa: E731 - memory shrinks with the shard
    bandwidth = rng.choice([0.0, 5.0, 50.0])  # gradient bytes per second (0: the all-reduce left out)
    sync = lambda a, b, c: allreduce_seconds(b - a, c, bandwidth)  # noqa: E731 - one gradient byte per unit
    for k in range(1, min(n, gpus) + 1):
        layout = best_layout(seconds, fits, n, k, gpus, batch, sync=sync)
        expected = layout_brute_force(seconds, fits, n, k, gpus, batch, sync)
        if expected == 0.0:
            assert layout is None
            continue
        assert layout.rate == pytest.approx(expected)
        assert sum(layout.counts) <= gpus and all(batch % c == 0 for c in layout.counts)
        assert len(layout.cuts) == k - 1 and max(layout.busy) == pytest.approx(1.0)


def test_allreduce_seconds_by_hand():
    assert allreduce_seconds(10**8, 4, 1e10) == pytest.approx(2 * 3 / 4 * 0.01)  # ring: 2(c-1)/c of the bytes
    assert allreduce_seconds(10**8, 1, 1e10) == 0.0 and allreduce_seconds(10**8, 4, 0.0) == 0.0


def test_the_all_reduce_cost_moves_the_layout_towards_fewer_replicas():
    seconds = {(0, 1): 0.010, (1, 2): 0.030, (2, 3): 0.030}
    fits = lambda a, b, c: True  # noqa: E731
    fast = best_layout(seconds, fits, 3, 3, 7, 126, cuts=[1, 2], sync=lambda a, b, c: allreduce_seconds(10**8, c, 1e10))
    # c = 3: 30/3 + 13.3 ms = 23.3 ms per batch; the all-reduce keeps the slow stages from the ideal 10 ms
    assert fast.counts == [1, 3, 3] and fast.rate == pytest.approx(1 / (0.010 + 2 * 2 / 3 * 0.01))
    assert fast.sync == pytest.approx([0.0, 0.04 / 3, 0.04 / 3]) and max(fast.busy) == pytest.approx(1.0)
    slow = best_layout(seconds, fits, 3, 3, 7, 126, cuts=[1, 2], sync=lambda a, b, c: allreduce_seconds(10**8, c, 1e8))
    assert slow.counts == [1, 1, 1]  # a second replica's all-reduce (1 s) costs more than half its step saves


def test_best_layout_replicates_the_slow_stages():
    seconds = {(0, 1): 0.010, (1, 2): 0.030, (2, 3): 0.030}  # bench/replicas.py's sleeping stages
    fits = lambda a, b, c: True  # noqa: E731
    assert best_layout(seconds, fits, 3, 3, 7, 128, cuts=[1, 2]).counts == [1, 2, 4]  # 3 does not divide 128
    seven = best_layout(seconds, fits, 3, 3, 7, 126, cuts=[1, 2])  # 126 = 2 * 3^2 * 7: 3 divides it
    assert seven.counts == [1, 3, 3] and seven.rate == pytest.approx(100.0)
    five = best_layout(seconds, fits, 3, 3, 5, 128, cuts=[1, 2])
    assert five.counts == [1, 2, 2] and five.busy == pytest.approx([2 / 3, 1.0, 1.0])
    assert best_layout(seconds, lambda a, b, c: c > 1, 3, 3, 5, 128, cuts=[1, 2]) is None  # 6 GPUs needed


def test_saved_bytes_counts_each_storage_once_and_leaves_out_excluded_ones():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)

    def forward():
        h = x @ w  # saves x (64 KiB) and w (excluded)
        return (h * h).sum()  # saves h (64 KiB) for both factors: counted once

    assert saved_bytes(forward, {w.untyped_storage().data_ptr()}) == 2 * 64 * 256 * 4


def test_module_memory_extrapolates_saved_bytes_linearly_and_keeps_the_rest():
    at_4, at_5 = ModuleMemory(saved=100, params=10, grads=10, optimizer=20), ModuleMemory(120, 10, 10, 20)
    assert at_4.at_batch(8, 4, at_5, 5) == ModuleMemory(saved=180, params=10, grads=10, optimizer=20)


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_extrapolated_plan_equals_the_plan_measured_at_the_training_batch(amp):
    """bf16 autocast saves the weights' bf16 copies, which do not grow with the batch: two batches tell them apart."""
    cfg = validate(Config(model="resnet8", model_args={"width": 4}, stages=3, batch_size=12, amp=amp))
    extrapolated = plan_split(dataclasses.replace(cfg, profile_batch=2), 1, 10, 8)
    measured = plan_split(dataclasses.replace(cfg, profile_batch=12), 1, 10, 8)
    assert extrapolated.table == measured.table and extrapolated.cuts == measured.cuts


def test_barlow_twins_is_planned_at_two_views_per_image():
    """A batch of b images is 2b rows: measured so, the plan at batch 6 equals the one measured at batch 6 directly."""
    cfg = validate(Config(model="resnet8", model_args={"width": 4}, stages=3, batch_size=6, local_loss="barlow_twins",
                          head="projector", last_head="projector", projector_width=8, augment=True, probe_size=0))
    extrapolated = plan_split(dataclasses.replace(cfg, profile_batch=2), 1, 10, 8)
    measured = plan_split(dataclasses.replace(cfg, profile_batch=6), 1, 10, 8)
    assert extrapolated.table == measured.table and extrapolated.cuts == measured.cuts
    with seeded_network(cfg, 1, 10, 8, sync_bn=False) as net:
        x, y = Profiler(cfg, net, 1, 10, 8, batch=3).batch(0, 3)
    assert len(x) == len(y) == 6


def expand_net(hidden: list[int], dim: int = 8, num_classes: int = 4, in_features: int = 16) -> Network:
    """Units that widen to hidden[i] and project back: unit i keeps about hidden[i] activations per sample."""
    units, d_in = [], in_features
    for h in hidden:
        units.append(nn.Sequential(nn.Flatten(), nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, dim)))
        d_in = dim
    return Network("expand", units, [0] * len(units), PoolLinear(dim, num_classes), layout="flat")


@pytest.mark.parametrize("hidden, stages, expected", [
    ([2048, 8, 8, 8, 8], 2, [1]),  # the wide unit alone; adding any other only grows the largest module
    ([8, 8, 8, 8, 2048], 2, [4]),
    ([2048, 8, 8, 8, 8, 2048], 3, [1, 5]),  # each wide unit alone, the narrow ones together
])
def test_plan_isolates_the_units_with_the_most_activations(hidden, stages, expected):
    cfg = validate(Config(model="expand", stages=stages, head="etf", batch_size=64, profile_batch=8))
    torch.manual_seed(0)
    plan = plan_network(cfg, expand_net(hidden), 1, 4, 4)
    assert plan.cuts == expected
    assert plan.units == module_ranges(expected, len(hidden))
    assert len(plan.seconds) == stages and all(s > 0 for s in plan.seconds)


def real_stage_memory(cfg: Config, x: torch.Tensor, y: torch.Tensor) -> list[ModuleMemory]:
    """Each stage's memory when the config's modules are built and trained as the trainer does, on one batch."""
    local = build_local_modules(cfg, 1, 10, 8)
    delta, memory = None, []
    for step in build_stage_steps(cfg, local, steps_per_epoch=1):
        m, result = step_memory(step, x, delta, y)
        memory.append(m)
        x, delta = result.out, result.delta
    return memory


@pytest.mark.parametrize("stages", [2, 3])
def test_plan_equals_the_best_split_measured_for_real(stages):
    """At the profiling batch (no scaling), each planned module needs exactly what the real stage needs, and no
    split of resnet8 built and trained the real way has a smaller largest stage."""
    cfg = validate(Config(model="resnet8", model_args={"width": 4}, stages=stages, batch_size=8, profile_batch=8))
    plan = plan_split(cfg, 1, 10, 8)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    assert [m.total for m in real_stage_memory(dataclasses.replace(cfg, split=plan.cuts), x, y)] == \
        [m.total for m in plan.memory]
    best = min(max(m.total for m in real_stage_memory(dataclasses.replace(cfg, split=list(cuts)), x, y))
               for cuts in itertools.combinations(range(1, 4), stages - 1))
    assert max(m.total for m in plan.memory) == best
    assert plan.global_bp.total == real_stage_memory(dataclasses.replace(cfg, method="bp"), x, y)[0].total


def test_resolve_auto_split_puts_the_planned_cuts_in_the_config():
    cfg = validate(Config(model="resnet8", model_args={"width": 4}, stages=3, split="auto", batch_size=8))
    resolved, plan = resolve_auto_split(cfg, 1, 10, 8)
    assert resolved.split == plan.cuts and len(plan.cuts) == 2
    assert len(build_local_modules(resolved, 1, 10, 8)) == 3
    unchanged, none = resolve_auto_split(dataclasses.replace(cfg, split=[1, 2]), 1, 10, 8)
    assert unchanged.split == [1, 2] and none is None


def test_auto_split_must_be_planned_and_needs_k():
    with pytest.raises(SplitError, match="split 'auto' is chosen by measurement"):
        resolve_cuts([0, 0, 1, 2], 3, "auto")
    with pytest.raises(ConfigError, match="split: auto needs stages"):
        validate(Config(stages=None, split="auto"))
    with pytest.raises(ConfigError, match="profile_batch must be >= 2"):
        validate(Config(profile_batch=1))
    with pytest.raises(ConfigError, match="method drtp trains one layer per module: use split: per_block"):
        validate(Config(method="drtp", head="etf", last_head="etf", split="auto"))
