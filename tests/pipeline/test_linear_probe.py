import torch

from pipeline.heads import Pool
from pipeline.linear_probe import frozen_features, train_linear
from pipeline.models import PoolLinear
from tests.pipeline.test_step import make_step, tiny_module


def test_a_linear_probe_separates_linearly_separable_features_and_records_each_epoch():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 4

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 3, (n,), generator=g)
        return centres[y] + torch.randn(n, 8, generator=g), y

    records = []
    accuracy = train_linear(sample(300), sample(100), 3, epochs=4, record=records.append)
    assert accuracy > 0.95 and [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_frozen_features_pool_the_last_modules_output_and_leave_the_modules_as_they_were():
    first, second = make_step(tiny_module(2, 4), PoolLinear(4, 3)), make_step(tiny_module(4, 5), PoolLinear(5, 3))
    before = [p.clone() for p in second.module.parameters()]
    x, y = torch.randn(6, 2, 5, 5), torch.arange(6) % 3
    features, labels = frozen_features([first, second], Pool("nchw"), iter([(x[:4], y[:4]), (x[4:], y[4:])]),
                                       torch.device("cpu"))
    assert features.shape == (6, 5) and torch.equal(labels, y)
    expected = second.eval_output(first.eval_output(x)).mean(dim=(2, 3))
    assert torch.allclose(features, expected, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, second.module.parameters()))
