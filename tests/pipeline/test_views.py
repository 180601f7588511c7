import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipeline.views import (DRAWS, PHOTOMETRIC, Photometric, blur, blur_kernel_size, brightness, contrast, grey, hue,
                            photometric_view, photometric_views, saturation, solarize, view_block)

NOTHING = Photometric(jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, channels: int = 3, size: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=seeded(seed))


@pytest.mark.parametrize("channels", [1, 3])
def test_each_transform_equals_torchvision_with_one_factor_per_image(channels):
    x = images(5, channels).float() / 255
    factors = torch.tensor([0.0, 0.6, 1.0, 1.3, 1.4])
    shifts = torch.tensor([-0.1, -0.04, 0.0, 0.07, 0.5])
    sigmas = torch.tensor([0.1, 0.6, 1.0, 1.7, 2.0])
    k = blur_kernel_size(20, 20)
    cases = [
        (brightness(x, factors), lambda i: TF.adjust_brightness(x[i], factors[i].item())),
        (contrast(x, factors), lambda i: TF.adjust_contrast(x[i], factors[i].item())),
        (saturation(x, factors), lambda i: TF.adjust_saturation(x[i], factors[i].item())),
        (hue(x, shifts), lambda i: TF.adjust_hue(x[i], shifts[i].item())),
        (blur(x, sigmas), lambda i: TF.gaussian_blur(x[i], [k, k], [sigmas[i].item()] * 2)),
        (solarize(x), lambda i: TF.solarize(x[i], 128 / 255)),
        (grey(x).expand_as(x), lambda i: TF.rgb_to_grayscale(x[i], channels)),
    ]
    for mine, theirs in cases:
        assert torch.allclose(mine, torch.stack([theirs(i) for i in range(5)]), atol=2e-6)


def test_the_blur_kernel_is_a_tenth_of_the_image_side_and_odd():
    assert [blur_kernel_size(s, s) for s in (8, 28, 32, 64, 224)] == [3, 3, 3, 7, 23]


def test_the_barlow_twins_recipe_is_the_papers():
    first, second = PHOTOMETRIC["barlow_twins"]
    for view in (first, second):
        assert (view.jitter, view.brightness, view.contrast, view.saturation, view.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
        assert view.grayscale == 0.2 and view.sigma == (0.1, 2.0)
    assert (first.blur, first.solarize, second.blur, second.solarize) == (1.0, 0.0, 0.1, 0.2)
    assert PHOTOMETRIC["none"] == ()


def test_a_view_with_nothing_to_do_returns_the_images_and_draws_the_same_count_per_image():
    x = images(7)
    g = seeded(3)
    assert torch.equal(photometric_view(x, NOTHING, g), x)
    for recipe in (NOTHING, PHOTOMETRIC["barlow_twins"][1]):
        a, b = seeded(3), seeded(3)
        photometric_view(images(7, seed=1), recipe, a)
        torch.rand(7, DRAWS, generator=b)
        assert torch.equal(a.get_state(), b.get_state())  # whatever the images hold: batches stay (seed, epoch)'s


def test_each_transform_fires_with_its_probability():
    bright = torch.full((4000, 3, 8, 8), 230, dtype=torch.uint8)
    out = photometric_view(bright, Photometric(jitter=0.0, grayscale=0.0, solarize=0.3), seeded(0))
    inverted = (out == 25).all(dim=(1, 2, 3)).float().mean().item()  # 255 - 230
    assert 0.27 < inverted < 0.33 and ((out == 25) | (out == 230)).all()
    colour = images(4000, size=8)
    out = photometric_view(colour, Photometric(jitter=0.0, grayscale=0.5), seeded(0))
    greyed = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert 0.47 < greyed.float().mean().item() < 0.53
    assert torch.equal(out[~greyed], colour[~greyed])
    blurred = photometric_view(colour, Photometric(jitter=0.0, grayscale=0.0, blur=1.0), seeded(0))
    variation = lambda t: t.float().diff(dim=3).abs().mean(dim=(1, 2, 3))  # noqa: E731
    assert (variation(blurred) <= variation(colour)).all()  # no image sharper,
    assert (variation(blurred) < variation(colour)).float().mean() > 0.8  # all but those of σ near 0.1 smoother


def test_jitter_changes_an_image_only_where_it_fires():
    x = images(2000, size=8)
    out = photometric_view(x, Photometric(jitter=0.8, grayscale=0.0), seeded(1))
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert 0.76 < changed < 0.84


def test_views_take_their_own_recipe_and_the_bits_do_not_depend_on_the_thread_count():
    x = images(64, size=16)
    first, second = Photometric(jitter=0.0, grayscale=0.0), Photometric(jitter=0.0, grayscale=0.0, solarize=1.0)
    out = photometric_views(x, (first, second), seeded(0))
    assert torch.equal(out[:32], x[:32]) and torch.equal(out[32:], torch.where(x[32:] >= 128, 255 - x[32:], x[32:]))
    assert photometric_views(x, (), torch.Generator()) is x
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(photometric_views(x, PHOTOMETRIC["barlow_twins"], seeded(5)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*runs)


def test_a_batch_that_does_not_split_into_equal_view_blocks_is_an_error_not_lost_rows():
    recipes = PHOTOMETRIC["barlow_twins"]
    assert view_block(6, recipes) == 3
    for rows in (5, 1):
        with pytest.raises(ValueError, match=f"a batch of {rows} rows does not split into 2 equal blocks"):
            photometric_views(images(rows, size=8), recipes, seeded(0))
