import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.probe import InputDriftProbe
from pipeline.step import StageStep


def linear_step() -> StageStep:
    torch.manual_seed(0)
    module, head = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 3)
    optimizer = torch.optim.SGD([*module.parameters(), *head.parameters()], lr=0.1)
    return StageStep(module, head, optimizer, is_first=False, is_last=False, send_delta=False)


def test_delta_loss_is_the_loss_change_caused_by_a_changed_input():
    step, probe = linear_step(), InputDriftProbe()
    x_old, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    out, first = probe(step, x_old, y)
    assert first is None  # nothing to compare with yet
    assert torch.equal(out, step.module(x_old).detach())
    x_new = x_old + 0.5
    _, delta = probe(step, x_new, y)
    with torch.no_grad():
        expected = F.cross_entropy(step.head(step.module(x_new)), y) - F.cross_entropy(step.head(step.module(x_old)), y)
    assert delta == float(expected) and delta != 0.0


def test_an_unchanged_input_gives_exactly_zero_even_after_the_module_trains():
    step, probe = linear_step(), InputDriftProbe()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    probe(step, x, y)
    step.train_step(x, None, y)  # module k's own update does not count: both losses use its new weights
    assert probe(step, x, y)[1] == 0.0
