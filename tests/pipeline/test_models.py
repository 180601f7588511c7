import pytest
import torch
import torch.nn as nn

from pipeline.models import BasicBlock
from pipeline.registry import build_network
from pipeline.splits import module_ranges, resolve_cuts


@pytest.mark.parametrize("depth,blocks", [(32, 5), (56, 9), (110, 18)])
def test_cifar_resnets_have_a_stem_and_three_stages_of_blocks(depth, blocks):
    net = build_network(f"resnet{depth}", 3, 10, 32)
    assert len(net.units) == 1 + 3 * blocks
    assert net.resolution == [0] + [0] * blocks + [1] * blocks + [2] * blocks
    widths = [u.conv2.out_channels for u in net.units[1:]]
    assert widths == [16] * blocks + [32] * blocks + [64] * blocks


def test_resnet32_output_shapes_and_parameter_count():
    net = build_network("resnet32", 3, 10, 32)
    x = torch.randn(2, 3, 32, 32)
    for unit in net.units:
        x = unit(x)
    assert x.shape == (2, 64, 8, 8)
    assert net.classifier(x).shape == (2, 10)
    n_params = sum(p.numel() for u in net.units for p in u.parameters())
    assert 0.45e6 < n_params < 0.48e6  # ResNet-32 on CIFAR has about 0.46M parameters


def test_plainnet_has_no_skip_connections():
    res, plain = build_network("resnet14", 1, 10, 28), build_network("plainnet14", 1, 10, 28)
    assert all(b.residual for b in res.units[1:]) and not any(b.residual for b in plain.units[1:])
    assert not any(isinstance(b.shortcut, nn.Sequential) for b in plain.units[1:])


@pytest.mark.parametrize("depth", [12, 17, 27, 57])
def test_vgg_depth_counts_conv_layers_plus_classifier(depth):
    net = build_network(f"vgg{depth}", 3, 10, 32)
    assert len(net.units) == depth - 1
    assert sorted(set(net.resolution)) == [0, 1, 2, 3, 4]
    x = torch.randn(2, 3, 32, 32)
    for unit in net.units:
        x = unit(x)
    assert x.shape == (2, 512, 1, 1)


@pytest.mark.parametrize("name", ["resnet8", "plainnet8", "vgg12"])
@pytest.mark.parametrize("shape", [(1, 28), (1, 8), (3, 32)])
def test_models_take_their_input_shape_from_the_data(name, shape):
    channels, size = shape
    net = build_network(name, channels, 7, size)
    x = torch.randn(2, channels, size, size)
    for unit in net.units:
        x = unit(x)
    assert net.classifier(x).shape == (2, 7)


def test_composition_of_modules_equals_the_whole_network():
    torch.manual_seed(0)
    net = build_network("resnet32", 3, 10, 32).units
    whole = nn.Sequential(*net).eval()
    x = torch.randn(3, 3, 32, 32)
    resolution = build_network("resnet32", 3, 10, 32).resolution
    for k in (2, 3, 16):
        parts = [nn.Sequential(*(net[i] for i in r)).eval() for r in module_ranges(resolve_cuts(resolution, k, None), 16)]
        h = x
        for part in parts:
            h = part(h)
        assert torch.equal(h, whole(x))


def test_bad_model_names_and_depths_are_errors():
    with pytest.raises(ValueError, match="unknown model 'densenet40'"):
        build_network("densenet40", 3, 10, 32)
    with pytest.raises(ValueError, match="6n\\+2"):
        build_network("resnet30", 3, 10, 32)
    with pytest.raises(ValueError, match="at least 6"):
        build_network("vgg4", 3, 10, 32)


def test_basic_block_downsamples_with_a_projection():
    block = BasicBlock(16, 32, 2, residual=True)
    assert block(torch.randn(1, 16, 8, 8)).shape == (1, 32, 4, 4)
