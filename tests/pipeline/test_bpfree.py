"""BP-free mode and its baselines: one layer per update, and FA / DFA / DRTP against hand-written matrix math."""
import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.bpfree import (dfa_signal, drtp_signal, fa_signal, output_error, pepita_feedback, pepita_input,
                             pepita_signal, random_feedback)
from pipeline.config import Config, ConfigError, validate
from pipeline.sgr import sgr_term
from pipeline.stages import build_local_modules, build_stage_steps
from pipeline.step import SignalStep
from pipeline.trainer import feedback_batch, pepita_batch, train_batch

CLASSES, WIDTH = 4, 6


def bpfree_config(method: str, **overrides) -> Config:
    values = dict(model="mlp3", model_args={"width": WIDTH, "norm": False}, stages=None, split="per_block",
                  head="etf", last_head="etf", method=method, lr=0.1, momentum=0.0, weight_decay=0.0,
                  lr_schedule="constant", seed=3)
    values.update(overrides)
    return validate(Config(**values))


def build(cfg: Config, in_channels: int = 1, size: int = 3):
    local = build_local_modules(cfg, in_channels, CLASSES, size)
    return local, build_stage_steps(cfg, local, steps_per_epoch=1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 1, 3, 3, generator=g), torch.tensor([0, 1, 2, 3, 1])


def test_output_error_is_the_cross_entropy_gradient_and_feedback_is_seeded():
    logits = torch.randn(5, CLASSES, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    assert torch.allclose(output_error(logits.detach(), y), grad, atol=1e-7)
    assert torch.equal(random_feedback(4, 7, seed=1), random_feedback(4, 7, seed=1))
    assert not torch.equal(random_feedback(4, 7, seed=1), random_feedback(4, 7, seed=2))
    assert random_feedback(4, 7, seed=1).shape == (4, 7)


def graph_nodes(loss: torch.Tensor) -> list:
    """Every autograd node the backward of `loss` would visit."""
    seen, stack = [], [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or any(node is s for s in seen):
            continue
        seen.append(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("model,args,size", [("mlp4", {"width": 16}, 4), ("plainconv4", {"width": 12}, 8)])
def test_a_bpfree_update_touches_one_layer(model, args, size):
    """The graph of module k's loss (CE through its fixed ETF head, plus the SGR term) reaches only layer k's parameters."""
    cfg = bpfree_config("sgr", model=model, model_args=args)
    local, _ = build(cfg, in_channels=2, size=size)
    assert all(list(lm.head.parameters()) == [] for lm in local)  # fixed ETF heads
    x, y = torch.randn(4, 2, size, size), torch.tensor([0, 1, 2, 3])
    delta_prev = None
    for lm in local:
        x = x.detach().requires_grad_()
        out = lm.module(x)
        loss_cls = F.cross_entropy(lm.head(out), y)
        names = [type(n).__name__ for n in graph_nodes(loss_cls)]
        assert sum(n.startswith(("AddmmBackward", "ConvolutionBackward")) for n in names) == 1  # one linear/conv
        loss = loss_cls
        if delta_prev is not None:
            (delta_now,) = torch.autograd.grad(loss_cls, x, create_graph=True, retain_graph=True)
            loss = loss_cls + sgr_term(delta_now, delta_prev)
        leaves = {id(n.variable) for n in graph_nodes(loss) if type(n).__name__ == "AccumulateGrad"}
        assert leaves == {id(p) for p in lm.module.parameters()} | {id(x)}  # this layer's weights and its own input
        (delta_prev,) = torch.autograd.grad(F.cross_entropy(lm.head(out), y), out)
        x = out


def hand_forward(local, x):
    """Weights, pre-activations z_l and outputs h_l of the plain ReLU MLP, by explicit matrix math."""
    weights = [(lm.module[0].fc.weight.detach().clone(), lm.module[0].fc.bias.detach().clone()) for lm in local]
    h, zs, hs = x.flatten(1), [], [x.flatten(1)]
    for w, b in weights:
        z = h @ w.T + b
        h = z.clamp_min(0)
        zs.append(z)
        hs.append(h)
    return weights, zs, hs


def assert_sgd_step(local, weights, hs, pre_signals, lr=0.1):
    """Layer l's new weights are W - lr dz_l^T h_{l-1}, b - lr Σ dz_l."""
    for lm, (w, b), h_in, dz in zip(local, weights, hs[:-1], pre_signals):
        assert torch.allclose(lm.module[0].fc.weight, w - lr * dz.T @ h_in, atol=1e-6)
        assert torch.allclose(lm.module[0].fc.bias, b - lr * dz.sum(0), atol=1e-6)


def test_bpfree_layer_step_is_the_analytic_update(batch):
    """Appendix D: with a fixed ETF head M, δ at a layer's output is e Mᵀ in closed form; the step applies exactly that."""
    x, y = batch
    local, steps = build(bpfree_config("layerwise", track_sgr=False))
    weights, zs, hs = hand_forward(local, x)
    frame = local[0].head.frame
    e = (F.softmax(hs[1] @ frame, dim=1) - F.one_hot(y, CLASSES)) / len(y)
    steps[0].send_delta = True
    result = steps[0].train_step(x, None, y)
    assert torch.allclose(result.delta, e @ frame.T, atol=1e-7)  # δ handed to module 2: analytic
    assert_sgd_step(local[:1], weights, hs, [(e @ frame.T) * (zs[0] > 0)])


@pytest.mark.parametrize("method", ["fa", "dfa", "drtp"])
def test_bpfree_baselines_match_a_hand_computed_step(batch, method):
    x, y = batch
    local, steps = build(bpfree_config(method))
    weights, zs, hs = hand_forward(local, x)
    assert [type(s) is SignalStep for s in steps] == [True, True, method != "drtp"]
    if method == "drtp":
        train_batch(steps, x, y)
    else:
        feedback_batch(steps, x, y)
    # the last layer learns from its own cross entropy through its fixed ETF head M3
    frame = local[2].head.frame
    e = (F.softmax(hs[3] @ frame, dim=1) - F.one_hot(y, CLASSES)) / len(y)
    dz3 = (e @ frame.T) * (zs[2] > 0)
    onehot = F.one_hot(y, CLASSES).float()
    if method == "fa":  # B3, B2 stand in for W3, W2 in the backward pass
        b3, b2 = steps[2].feedback, steps[1].feedback
        assert b3.shape == weights[2][0].shape and torch.equal(b3, random_feedback(WIDTH, WIDTH, 1000 * 3 + 2))
        dz2 = (dz3 @ b3) * (zs[1] > 0)
        dz1 = (dz2 @ b2) * (zs[0] > 0)
    elif method == "dfa":  # the output error e straight to each layer through B_l (C×D)
        b2, b1 = steps[1].feedback, steps[0].feedback
        assert torch.equal(b1, random_feedback(CLASSES, WIDTH, 1000 * 3 + 0))
        dz2 = (e @ b2) * (zs[1] > 0)
        dz1 = (e @ b1) * (zs[0] > 0)
    else:  # DRTP: −onehot(y)/N in place of e
        b2, b1 = steps[1].feedback, steps[0].feedback
        dz2 = (-onehot / len(y) @ b2) * (zs[1] > 0)
        dz1 = (-onehot / len(y) @ b1) * (zs[0] > 0)
    assert_sgd_step(local, weights, hs, [dz1, dz2, dz3])


def test_pepita_matches_a_hand_computed_step(batch):
    """Clean pass, error e, modulated pass on x + e F; W_l -= lr (h_l − h_l^mod)ᵀ/N h_{l-1}^mod, the last layer by its
    loss gradient at the modulated input; no ReLU derivative anywhere."""
    x, y = batch
    local, steps = build(bpfree_config("pepita"))
    weights, _, hs = hand_forward(local, x)
    frame = local[2].head.frame
    error = F.softmax(hs[3] @ frame, dim=1) - F.one_hot(y, CLASSES)
    pepita_batch(steps, x, y)
    f = steps[0].feedback
    assert torch.equal(f, pepita_feedback(CLASSES, 9, 1000 * 3 + 0)) and f.abs().max() <= 0.05 * (6 / 9) ** 0.5
    h, modulated = x.flatten(1) + error @ f, []
    for w, b in weights:
        modulated.append(h)
        h = (h @ w.T + b).clamp_min(0)
    modulated.append(h)
    n = len(y)
    signals = [(hs[1] - modulated[1]) / n, (hs[2] - modulated[2]) / n, error / n @ frame.T]
    assert_sgd_step(local, weights, modulated, signals)


def test_pepita_pieces_and_its_layers():
    x, error, f = torch.randn(2, 1, 2, 2), torch.randn(2, 3), torch.randn(3, 4)
    assert torch.equal(pepita_input(x, error, f), x + (error @ f).reshape(2, 1, 2, 2))
    assert torch.equal(pepita_signal(torch.ones(4, 2), torch.zeros(4, 2)), torch.full((4, 2), 0.25))
    local, steps = build(bpfree_config("pepita", model="plainconv3", model_args={"width": 4}), in_channels=2, size=4)
    stats = pepita_batch(steps, torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2]))  # conv layers: the same rule
    assert len(stats) == 3 and all(torch.isfinite(s.loss) for s in stats)
    with pytest.raises(ConfigError, match="method pepita updates each layer at the input of its ReLU"):
        build(bpfree_config("pepita", model="resnet8", model_args={"width": 4}), in_channels=2, size=8)


def test_signal_functions_shapes():
    error, y = torch.randn(5, CLASSES), torch.tensor([0, 1, 2, 3, 1])
    feedback = torch.randn(CLASSES, 2 * 3 * 3)
    assert dfa_signal(error, feedback, torch.Size([5, 2, 3, 3])).shape == (5, 2, 3, 3)
    assert torch.equal(drtp_signal(y, feedback, torch.Size([5, 18])), -F.one_hot(y, CLASSES).float() / 5 @ feedback)
    assert torch.equal(fa_signal(torch.ones(5, 3), torch.eye(3)), torch.ones(5, 3))


def test_drtp_on_conv_layers_and_fa_dfa_refuse_a_lone_train_step(batch):
    cfg = bpfree_config("drtp", model="plainconv3", model_args={"width": 4})
    local, steps = build(cfg, in_channels=2, size=4)
    before = copy.deepcopy(local[0].module.state_dict())
    out = steps[0].train_step(torch.randn(3, 2, 4, 4), None, torch.tensor([0, 1, 2])).out
    assert out.shape == (3, 4, 4, 4) and steps[0].feedback.shape == (CLASSES, 64)
    assert not torch.equal(before["0.0.weight"], local[0].module[0][0].weight)
    _, fa_steps = build(bpfree_config("fa"))
    with pytest.raises(ValueError, match="needs the output error"):
        fa_steps[0].train_step(batch[0], None, batch[1])


def test_track_sgr_is_ignored_by_the_bpfree_baselines(batch):
    """Their layers pass no δ, so DRTP's last (ordinary) module must not wait for one."""
    _, steps = build(bpfree_config("drtp", track_sgr=True))
    assert not steps[-1].needs_delta
    assert len(train_batch(steps, *batch)) == 3


@pytest.mark.parametrize("overrides,message", [
    (dict(method="fa", model="plainconv3", model_args={"width": 4}), "use an mlp<depth> model"),
    (dict(method="dfa", split=[2], stages=None), "module 1 holds 2 units: use split: per_block"),
])
def test_bpfree_network_mistakes_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(bpfree_config(**overrides), in_channels=2, size=4)


def test_bpfree_baselines_need_fixed_etf_heads():
    with pytest.raises(ConfigError, match="set head: etf and last_head: etf"):
        validate(Config(method="drtp", head="conv_linear"))
