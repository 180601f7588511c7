import pytest
import torch
import torch.nn as nn

from pipeline.lars import BIAS_LR_RATIO, LARS, split_for_lars


def test_lars_step_by_its_definition():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    w.grad = torch.tensor([[0.5, 0.0]])
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.1, eta=0.01)
    g = torch.tensor([[0.5 + 0.3, 0.4]])  # ∇ + wd·w
    g1 = g * (0.01 * 5 / g.norm())
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * g1)
    w.grad = torch.tensor([[0.0, 1.0]])
    g = torch.tensor([[0.0, 1.0]]) + 0.1 * w.detach()
    g2 = g * (0.01 * w.detach().norm() / g.norm())
    expected = w.detach() - 0.1 * (0.9 * g1 + g2)  # momentum: μ = 0.9·g1 + g2
    opt.step()
    assert torch.allclose(w.detach(), expected)


def test_lars_leaves_biases_unadapted_at_a_smaller_rate_and_a_zero_weight_unscaled():
    layer = nn.Linear(2, 1)
    groups = split_for_lars(layer.parameters())
    assert groups[0]["params"] == [layer.weight] and groups[1]["params"] == [layer.bias]
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(1.0)
    layer.weight.grad, layer.bias.grad = torch.tensor([[2.0, 0.0]]), torch.tensor([3.0])
    LARS(groups, lr=1.0, momentum=0.0, weight_decay=0.5, eta=0.001).step()
    assert layer.weight.detach().tolist() == [[-2.0, 0.0]]  # ‖w‖ = 0: trust ratio 1
    assert layer.bias.item() == pytest.approx(1.0 - BIAS_LR_RATIO * 3.0)  # no decay, no trust ratio


def test_lars_state_survives_a_state_dict_round_trip():
    w = nn.Parameter(torch.ones(2, 2))
    w.grad = torch.ones(2, 2)
    opt = LARS([w], lr=0.1)
    opt.step()
    again = LARS([w], lr=0.1)
    again.load_state_dict(opt.state_dict())
    assert again.state[w]["momentum_buffer"].equal(opt.state[w]["momentum_buffer"])
