"""Every YAML under configs/ loads and validates; the CIFAR ones (all but ImageNet) also build their modules and steps."""
import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.config import load_yaml, validate
from pipeline.stages import build_local_modules, build_stage_steps

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
CLASSES = {"cifar10": 10, "cifar100": 100, "fashion_mnist": 10}


def test_configs_were_found():
    assert len([p for p in CONFIGS if "paper" in p.parts]) >= 70


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_loads_validates_and_builds(path):
    cfg = load_yaml(path)
    if not torch.cuda.is_available():  # GPU configs (ImageNet) are checked for everything but the device here
        cfg = dataclasses.replace(cfg, device="cpu")
    cfg = validate(cfg)
    assert Path(cfg.out).name == path.stem or path.parent.name == "configs"  # a paper config writes its own run dir
    if cfg.dataset not in CLASSES:
        return  # ImageNet models: validated only here (tests/pipeline/test_models_torchvision.py builds them)
    channels = 1 if cfg.dataset == "fashion_mnist" else 3
    size = 28 if cfg.dataset == "fashion_mnist" else 32
    local = build_local_modules(cfg, channels, CLASSES[cfg.dataset], size)
    assert len(build_stage_steps(cfg, local, steps_per_epoch=10)) == len(local)
