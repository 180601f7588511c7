import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (barlow_twins_loss, infopro_coefficients, infopro_loss, infopro_weights, reconstruction_loss,
                             standardize)


def test_infopro_weights_move_linearly_with_depth_over_the_modules_that_have_a_decoder():
    k4 = infopro_coefficients(4)  # published for ResNet-32: λ1 6 → 1, λ2 0 → 2 over modules 1..3
    assert [infopro_weights(k, 4, k4) for k in range(3)] == [(6.0, 0.0), (3.5, 1.0), (1.0, 2.0)]
    assert infopro_weights(0, 2, infopro_coefficients(2)) == (5.0, 1.0)  # K = 2: one decoder, the first pair
    assert [infopro_weights(k, 3, infopro_coefficients(3)) for k in range(2)] == [(5.0, 0.0), (5.0, 0.1)]


def test_infopro_coefficients_given_win_and_an_unpublished_k_asks_for_them():
    assert infopro_coefficients(5, [1, 2, 3, 4]) == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="give infopro_lambdas"):
        infopro_coefficients(5)


def test_reconstruction_loss_by_hand():
    logits = torch.tensor([[[[0.0, math.log(3.0)]]]])  # sigmoid: 0.5 and 0.75
    image = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)  # targets 0 and 1
    expected = (-math.log(0.5) - math.log(0.75)) / 2
    assert reconstruction_loss(logits, image).item() == pytest.approx(expected)


def test_infopro_loss_weighs_its_two_terms_and_drops_a_zero_one():
    logits, y = torch.tensor([[2.0, 0.0]]), torch.tensor([1])
    decoded, image = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)
    ce, bce = F.cross_entropy(logits, y).item(), math.log(2.0)
    assert infopro_loss(logits, y, decoded, image, (2.0, 3.0)).item() == pytest.approx(2 * bce + 3 * ce)
    assert infopro_loss(logits, y, decoded, image, (2.0, 0.0)).item() == pytest.approx(2 * bce)
    assert infopro_loss(logits, y, None, image, (0.0, 3.0)).item() == pytest.approx(3 * ce)


def test_barlow_twins_loss_is_zero_when_the_cross_correlation_is_the_identity():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # centred, unit variance, uncorrelated
    assert standardize(z, eps=0.0).equal(z)
    assert barlow_twins_loss(z, z, off_diagonal_weight=0.5, eps=0.0).item() == 0.0


def test_barlow_twins_loss_by_hand_on_a_2x2_cross_correlation():
    z1 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # standardised already
    z2 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    # C = z1ᵀ z2 / 2 = [[1, -1], [1, -1]]: diagonal (1, -1), off-diagonal (-1, 1)
    on, off = (1 - 1) ** 2 + (1 - -1) ** 2, (-1) ** 2 + 1 ** 2
    assert barlow_twins_loss(z1, z2, off_diagonal_weight=0.25, eps=0.0).item() == pytest.approx(on + 0.25 * off)


def test_barlow_twins_loss_ignores_each_columns_scale_and_offset():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    scaled = z1 * torch.tensor([2.0, 0.5, 7.0]) + 3.0
    assert barlow_twins_loss(scaled, z2, 0.005, eps=0.0).item() == pytest.approx(
        barlow_twins_loss(z1, z2, 0.005, eps=0.0).item(), rel=1e-5)


def test_barlow_twins_loss_stays_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = barlow_twins_loss(z1, z2, 0.005)
    assert loss.dtype == torch.float32 and loss.item() == barlow_twins_loss(z1, z2, 0.005).item()
