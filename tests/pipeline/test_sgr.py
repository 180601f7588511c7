import pytest
import torch

from pipeline.sgr import normalize_per_sample, sgr_term


def test_hand_computed_value():
    now = torch.tensor([[3.0, 4.0]])  # normalised: (0.6, 0.8)
    prev = torch.tensor([[2.0, 0.0]])  # normalised: (1, 0)
    # squared differences: 0.16 and 0.64
    assert sgr_term(now, prev, "mean").item() == pytest.approx(0.4)
    assert sgr_term(now, prev, "sample").item() == pytest.approx(0.8)
    assert sgr_term(now, prev, "none").tolist() == pytest.approx([0.8])


def test_normalisation_is_per_sample_over_flattened_features():
    g = torch.randn(4, 3, 5, 5)
    n = normalize_per_sample(g)
    assert n.shape == (4, 75)
    assert torch.allclose(n.norm(dim=1), torch.ones(4))
    assert torch.allclose(n[2], g[2].flatten() / g[2].norm())


def test_sample_reduction_is_two_minus_two_cosine_and_independent_of_size():
    for size in (10, 1000):
        a, b = torch.randn(8, size), torch.randn(8, size)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        assert torch.allclose(sgr_term(a, b, "sample"), (2 - 2 * cos).mean(), atol=1e-6)
        assert torch.allclose(sgr_term(a, b, "mean"), (2 - 2 * cos).mean() / size, atol=1e-6)


def test_zero_gradients_give_a_finite_term_and_finite_double_backward():
    w = torch.randn(3, requires_grad=True)
    now = torch.zeros(2, 3) * w  # all-zero gradient that still depends on w
    prev = torch.zeros(2, 3)
    term = sgr_term(now, prev)
    assert torch.isfinite(term) and term.item() == 0.0
    (gw,) = torch.autograd.grad(term, w)
    assert torch.isfinite(gw).all()
    term2 = sgr_term(torch.zeros(2, 3) * w, torch.randn(2, 3))
    (gw2,) = torch.autograd.grad(term2, w)
    assert torch.isfinite(term2) and torch.isfinite(gw2).all()


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="equal gradient shapes"):
        sgr_term(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="unknown SGR reduction"):
        sgr_term(torch.ones(2, 3), torch.ones(2, 3), "sum")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sgr_term_is_computed_in_float32_whatever_the_gradients_dtype(dtype):
    g = torch.Generator().manual_seed(3)
    now, prev = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    now[1] = 0  # an all-zero sample: float16's eps would round to 0 and give NaN
    term = sgr_term(now.to(dtype), prev.to(dtype))
    assert term.dtype == torch.float32 and torch.isfinite(term)
    assert torch.allclose(term, sgr_term(now.to(dtype).float(), prev.to(dtype).float()))
