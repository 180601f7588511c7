import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.heads import ProjectorHead
from pipeline.knn import knn_scores
from pipeline.losses import barlow_twins_loss
from pipeline.models import PoolLinear
from pipeline.sgr import sgr_term
from pipeline.step import BarlowTwinsStep, StageStep, delta_flow


def tiny_module(c_in: int = 2, c_out: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


def make_step(module, head, *, lam=0.0, is_first=False, is_last=False, send_delta=True, reforward=False, lr=0.1):
    params = [*module.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    return StageStep(module, head, opt, lam=lam, is_first=is_first, is_last=is_last,
                     send_delta=send_delta, reforward=reforward)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 2, 5, 5, generator=g), torch.randint(0, 3, (6,), generator=g), torch.randn(6, 2, 5, 5, generator=g)


def test_step_is_exactly_the_documented_update(batch):
    """StageStep against Algorithm 1 of docs/sgr-method.md written out by hand, to the bit."""
    torch.manual_seed(1)
    x, y, delta_prev = batch
    module, head, lam = tiny_module(), PoolLinear(4, 3), 3.0
    ref_module, ref_head = copy.deepcopy(module), copy.deepcopy(head)
    step = make_step(module, head, lam=lam)
    result = step.train_step(x, delta_prev, y)

    ref_opt = torch.optim.SGD([*ref_module.parameters(), *ref_head.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    xr = x.clone().requires_grad_()
    out = ref_module(xr)
    loss_cls = F.cross_entropy(ref_head(out), y)
    (delta_now,) = torch.autograd.grad(loss_cls, xr, create_graph=True, retain_graph=True)
    loss = loss_cls + lam * sgr_term(delta_now, delta_prev)
    (delta_out,) = torch.autograd.grad(loss_cls, out, retain_graph=True)
    ref_opt.zero_grad()
    loss.backward()
    ref_opt.step()

    assert torch.equal(result.out, out.detach())
    assert torch.equal(result.delta, delta_out)
    assert torch.equal(result.stats.loss, loss_cls.detach())
    for p, q in zip([*module.parameters(), *head.parameters()], [*ref_module.parameters(), *ref_head.parameters()]):
        assert torch.equal(p, q)
    for b, c in zip(module.buffers(), ref_module.buffers()):
        assert torch.equal(b, c)


def test_sgr_term_changes_the_update_through_batchnorm(batch):
    """The double backward reaches BatchNorm's and the conv's parameters: λ > 0 moves them differently."""
    x, y, delta_prev = batch
    torch.manual_seed(2)
    base_module, base_head = tiny_module(), PoolLinear(4, 3)
    grads = {}
    for lam in (0.0, 10.0):
        module, head = copy.deepcopy(base_module), copy.deepcopy(base_head)
        step = make_step(module, head, lam=lam)
        step.optimizer.step = lambda: None  # keep the gradients, skip the update
        result = step.train_step(x, delta_prev, y)
        grads[lam] = [p.grad.clone() for p in module.parameters()]
        assert all(torch.isfinite(g).all() for g in grads[lam])
        if lam:
            assert result.stats.sgr.item() > 0
    bn_weight = 2  # conv weight, conv bias, BN weight, BN bias
    assert not torch.equal(grads[0.0][bn_weight], grads[10.0][bn_weight])
    assert not torch.equal(grads[0.0][0], grads[10.0][0])


def test_delta_passed_on_is_the_classification_gradient_only(batch):
    x, y, delta_prev = batch
    torch.manual_seed(3)
    module, head = tiny_module(), PoolLinear(4, 3)
    before_module, before_head = copy.deepcopy(module), copy.deepcopy(head)
    result = make_step(module, head, lam=100.0).train_step(x, delta_prev, y)
    xr = x.clone().requires_grad_()
    out = before_module(xr)
    (expected,) = torch.autograd.grad(F.cross_entropy(before_head(out), y), out)
    assert torch.equal(result.delta, expected)
    assert not result.delta.requires_grad and not result.out.requires_grad


def test_isolation_module_k_never_touches_module_k_minus_1(batch):
    x, y, _ = batch
    torch.manual_seed(4)
    m1, h1, m2, h2 = tiny_module(2, 4), PoolLinear(4, 3), tiny_module(4, 4), PoolLinear(4, 3)
    first = make_step(m1, h1, is_first=True)
    second = make_step(m2, h2, lam=5.0, is_last=True, send_delta=False)
    r1 = first.train_step(x, None, y)
    params = [p.detach().clone() for p in m1.parameters()]
    grads = [p.grad.clone() for p in m1.parameters()]
    buffers = [b.clone() for b in m1.buffers()]
    r2 = second.train_step(r1.out, r1.delta, y)
    assert r2.out is None and r2.delta is None
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), params))
    assert all(torch.equal(p.grad, g) for p, g in zip(m1.parameters(), grads))
    assert all(torch.equal(b, c) for b, c in zip(m1.buffers(), buffers))
    assert r1.out.grad_fn is None


def test_first_module_has_no_sgr_term(batch):
    x, y, _ = batch
    step = make_step(tiny_module(), PoolLinear(4, 3), lam=5.0, is_first=True)
    assert not step.needs_delta
    assert step.train_step(x, None, y).stats.sgr.item() == 0.0


def test_missing_delta_is_an_error(batch):
    x, y, _ = batch
    with pytest.raises(ValueError, match="received no δ"):
        make_step(tiny_module(), PoolLinear(4, 3), lam=1.0).train_step(x, None, y)


def test_reforward_passes_the_post_update_output(batch):
    x, y, _ = batch
    torch.manual_seed(5)
    module, head = tiny_module(), PoolLinear(4, 3)
    initial_module, initial_head = copy.deepcopy(module), copy.deepcopy(head)
    result = make_step(module, head, is_first=True, send_delta=False, reforward=True).train_step(x, None, y)
    with torch.no_grad():
        expected = copy.deepcopy(module).train()(x)
    assert torch.equal(result.out, expected)
    plain = make_step(initial_module, initial_head, is_first=True, send_delta=False).train_step(x, None, y)
    assert not torch.allclose(plain.out, result.out)


def test_track_sgr_measures_without_changing_the_update(batch):
    x, y, delta_prev = batch
    torch.manual_seed(6)
    m, h = tiny_module(), PoolLinear(4, 3)
    m2, h2 = copy.deepcopy(m), copy.deepcopy(h)
    xr = x.clone().requires_grad_()
    (delta_now,) = torch.autograd.grad(F.cross_entropy(copy.deepcopy(h)(copy.deepcopy(m)(xr)), y), xr)
    plain = make_step(m, h).train_step(x, None, y)
    tracking = make_step(m2, h2)
    tracking.track_sgr = True
    tracked = tracking.train_step(x, delta_prev, y)
    assert torch.allclose(tracked.stats.sgr, sgr_term(delta_now, delta_prev))
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))
    assert torch.equal(plain.out, tracked.out)


def test_channels_last_gives_the_same_update(batch):
    x, y, delta_prev = batch
    torch.manual_seed(1)
    module, head = tiny_module(), PoolLinear(4, 3)
    steps = [make_step(copy.deepcopy(module), copy.deepcopy(head), lam=3.0) for _ in range(2)]
    steps[1] = StageStep(steps[1].module, steps[1].head, steps[1].optimizer, lam=3.0, is_first=False, is_last=False,
                         send_delta=True, channels_last=True)
    plain, nhwc = (s.train_step(x, delta_prev, y) for s in steps)
    assert steps[1].module[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain.out, nhwc.out, atol=1e-5) and torch.allclose(plain.delta, nhwc.delta, atol=1e-6)
    for p, q in zip(steps[0].module.parameters(), steps[1].module.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("rng_seed", [5, None])
def test_dropout_draws_from_the_module_own_stream(batch, rng_seed):
    """With rng_seed, what the rest of the process draws between steps changes nothing; without it, it does."""
    x, y, delta_prev = batch
    outputs = []
    for other_draws in (0, 100):
        torch.manual_seed(0)
        module = nn.Sequential(tiny_module(), nn.Dropout(0.5))
        step = StageStep(module, PoolLinear(4, 3), torch.optim.SGD(module.parameters(), lr=0.1), lam=1.0,
                         is_first=False, is_last=False, send_delta=True, rng_seed=rng_seed)
        step.train_step(x, delta_prev, y)
        torch.rand(other_draws)  # another module, in the same process, draws in between
        outputs.append(step.train_step(x, delta_prev, y).out)
    assert torch.equal(outputs[0], outputs[1]) == (rng_seed is not None)


@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16])
def test_output_and_delta_are_passed_on_in_the_wire_dtype(batch, wire):
    x, y, _ = batch
    step = StageStep(tiny_module(), PoolLinear(4, 3), torch.optim.SGD([*tiny_module().parameters()], lr=0.1),
                     is_first=True, is_last=False, send_delta=True, amp=True, wire_dtype=wire)
    result = step.train_step(x, None, y)
    assert result.out.dtype == wire and result.delta.dtype == wire
    out, logits = step.eval_forward(x)
    assert out.dtype == wire and logits.dtype == torch.float32
    nxt_module, nxt_head = tiny_module(4, 4), PoolLinear(4, 3)  # the next module (same amp) takes what arrives
    nxt = StageStep(nxt_module, nxt_head, torch.optim.SGD([*nxt_module.parameters(), *nxt_head.parameters()], lr=0.1),
                    lam=1.0, is_first=False, is_last=True, send_delta=False, amp=True, wire_dtype=wire)
    stats = nxt.train_step(result.out, result.delta, y).stats
    assert torch.isfinite(stats.sgr) and stats.sgr.dtype == torch.float32


@pytest.mark.parametrize("lam, track, expected", [
    # per module k of 3: (λ, needs δ, sends δ)
    (5.0, False, [(0.0, False, True), (5.0, True, True), (5.0, True, False)]),  # sgr
    (0.0, False, [(0.0, False, False)] * 3),  # layerwise: no δ anywhere
    (0.0, True, [(0.0, False, True), (0.0, True, True), (0.0, True, False)]),  # λ = 0, the term measured
])
def test_one_decision_says_each_modules_lambda_and_who_needs_and_sends_delta(lam, track, expected):
    flows = [delta_flow(lam, track, k, 3) for k in range(3)]
    assert [(f.lam, f.needs_delta, f.sends_delta) for f in flows] == expected
    assert all(a.sends_delta == b.needs_delta for a, b in zip(flows, flows[1:]))  # what is sent is what is needed


def test_infopro_images_go_to_every_module_but_the_last_and_are_sent_only_to_one_that_needs_them():
    flows = [delta_flow(0.0, False, k, 4, images=True) for k in range(4)]
    assert [(f.needs_image, f.sends_image) for f in flows] == [(True, True), (True, True), (True, False), (False, False)]
    assert not any(delta_flow(1.0, False, k, 4).needs_image for k in range(4))


def test_a_step_restored_from_its_state_dict_continues_exactly(batch):
    x, y, delta_prev = batch
    torch.manual_seed(3)
    module, head = nn.Sequential(tiny_module(), nn.Dropout(0.3)), PoolLinear(4, 3)

    def fresh(lr=0.1, momentum=0.9):
        m, h = copy.deepcopy(module), copy.deepcopy(head)
        opt = torch.optim.SGD([*m.parameters(), *h.parameters()], lr=lr, momentum=momentum)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.7 ** s)  # as build_optimizer: a factor per step
        return StageStep(m, h, opt, sched, lam=2.0, is_first=False, is_last=False, send_delta=True, rng_seed=9)

    original = fresh()
    original.train_step(x, delta_prev, y)
    original.train_step(x, delta_prev, y)
    state = copy.deepcopy(original.state_dict())
    restored = fresh()
    restored.load_state_dict(state)
    assert set(state) == {"module", "head", "optimizer", "scheduler", "rng_module"}
    assert restored.optimizer.param_groups[0]["lr"] == original.optimizer.param_groups[0]["lr"] == 0.1 * 0.7 ** 2
    a, b = original.train_step(x, delta_prev, y), restored.train_step(x, delta_prev, y)
    assert torch.equal(a.out, b.out) and torch.equal(a.delta, b.delta)  # same weights, momentum, lr and dropout draw
    assert all(torch.equal(p, q) for p, q in zip(original.module.parameters(), restored.module.parameters()))

    # a resume that changes the optimizer's settings (launch.py --resume DIR --lr ...) trains with them from there on,
    # at the schedule's position and with the momentum buffers the checkpoint holds
    changed = fresh(lr=0.02, momentum=0.5)
    changed.load_state_dict(copy.deepcopy(state))
    group = changed.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], changed.scheduler.last_epoch) == (0.02 * 0.7 ** 2, 0.5, 2)
    assert changed.scheduler.get_last_lr() == [group["lr"]]
    buffers = [changed.optimizer.state[p]["momentum_buffer"] for p in changed.module.parameters()]
    assert all(torch.equal(b, s["momentum_buffer"]) for b, s in zip(buffers, state["optimizer"]["state"].values()))
    changed.train_step(x, delta_prev, y)
    assert changed.optimizer.param_groups[0]["lr"] == 0.02 * 0.7 ** 3


def barlow_step(module, head, **kwargs):
    opt = torch.optim.SGD([*module.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    return BarlowTwinsStep(module, head, opt, off_diagonal_weight=0.01, knn_k=2, is_first=False, is_last=False,
                           send_delta=True, **kwargs)


def test_barlow_twins_step_trains_on_the_two_views_loss_and_sends_its_gradient(batch):
    x, y, delta_prev = batch  # 6 rows: views 0..2 and 3..5
    torch.manual_seed(0)
    module, head = tiny_module(), ProjectorHead(4, 8, "nchw")
    step = barlow_step(module, head, lam=1.0)
    ref_module, ref_head = copy.deepcopy(module), copy.deepcopy(head)
    xr = x.clone().requires_grad_()
    out = ref_module(xr)
    z1, z2 = ref_head(out).chunk(2)
    loss = barlow_twins_loss(z1, z2, 0.01)
    delta_in, delta_out = torch.autograd.grad(loss, (xr, out), retain_graph=True)
    result = step.train_step(x, delta_prev, y)
    assert result.stats.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(result.delta, delta_out, atol=1e-7)  # module k+1 reconciles with this loss's gradient
    assert result.stats.sgr.item() == pytest.approx(sgr_term(delta_in, delta_prev).item(), rel=1e-5)
    assert result.stats.correct.item() == 0  # no classifier: k-NN scores it at evaluation


def test_barlow_twins_step_is_scored_by_knn_against_the_bank_it_remembers(batch):
    x, y, _ = batch
    step = barlow_step(tiny_module(), ProjectorHead(4, 8, "nchw"))
    with pytest.raises(RuntimeError, match="bank"):
        step.eval_forward(x)
    out = step.remember(x, y)
    assert torch.equal(out, step.eval_output(x))
    _, scores = step.eval_forward(x)
    features = step.eval_output(x).mean(dim=(2, 3))
    assert torch.allclose(scores, knn_scores(features, y, features, k=2))
    step.forget()
    with pytest.raises(RuntimeError, match="bank"):
        step.eval_forward(x)
