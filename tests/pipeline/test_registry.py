import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.models import Network, cifar_resnet
from pipeline.registry import REGISTRY, build_network, model_names, register_model

ROOT = Path(__file__).parents[2]


def test_every_family_and_fixed_model_is_registered_once():
    assert model_names() == ["resnet<depth>", "plainnet<depth>", "vgg<depth>", "mlp<depth>", "plainconv<depth>",
                             "tv_resnet18", "tv_resnet50", "tv_resnet101", "vit_s16", "swin_t", "swin_s"]
    assert all(entry.about for entry in REGISTRY.values())
    with pytest.raises(ValueError, match="'resnet' is registered already"):
        register_model("resnet", with_depth=True)(cifar_resnet)


def test_a_registered_model_is_built_by_name_and_an_unknown_name_quotes_the_registry():
    @register_model("tinynet", with_depth=True, about="a test family")
    def tinynet(depth: int, in_channels: int, num_classes: int, input_size: int, width: int = 4) -> Network:
        return cifar_resnet(8, in_channels, num_classes, input_size, width=width * depth)

    try:
        net = build_network("tinynet2", 3, 10, 32, width=2)
        assert net.units[0][0].out_channels == 4 and "tinynet<depth>" in model_names()
        with pytest.raises(ValueError, match=r"unknown model 'tinynet'; use one of resnet<depth>, .*tinynet<depth>"):
            build_network("tinynet", 3, 10, 32)  # a family needs its depth
        with pytest.raises(ValueError, match="unknown model 'vit_s17'"):
            build_network("vit_s17", 3, 10, 32)  # a fixed model takes none
    finally:
        del REGISTRY["tinynet"]


@pytest.mark.parametrize("name", ["ResNet", "resnet32", "9net", "my-net"])
def test_bad_registered_names_are_refused(name):
    with pytest.raises(ValueError, match="model name"):
        register_model(name, with_depth=True)


def test_the_cli_lists_the_models():
    proc = subprocess.run([sys.executable, "launch.py", "models"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| model | what it is |" and len(lines) == 2 + len(REGISTRY)
    assert lines[2].startswith("| resnet<depth> | CIFAR ResNet-(6n+2)")
