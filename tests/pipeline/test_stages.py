import os

import pytest
import torch

from pipeline.config import Config, ConfigError
from pipeline.heads import ProjectorHead
from pipeline.lars import BIAS_LR_RATIO, LARS
from pipeline.registry import model_args_of
from pipeline.stages import (build_local_modules, build_net, build_stage_steps, configure_torch, cuts_of,
                             split_cuts)
from pipeline.step import BarlowTwinsStep


@pytest.mark.parametrize("method, stages, split", [("sgr", 3, None), ("sgr", 2, None), ("layerwise", 4, "even"),
                                                   ("bp", 1, None)])
def test_the_cuts_of_built_modules_are_the_configs_cuts(method, stages, split):
    cfg = Config(model="resnet14", method=method, stages=stages, split=split)
    local = build_local_modules(cfg, 3, 10, 32)
    assert cuts_of(local) == split_cuts(cfg, 3, 10, 32) and len(cuts_of(local)) == len(local) - 1


def test_a_barlow_twins_config_builds_projector_steps_with_lars_on_weights_only():
    cfg = Config(dataset="digits", model="resnet8", stages=2, local_loss="barlow_twins", head="projector",
                 last_head="projector", projector_width=16, augment=True, probe_size=0, optimizer="lars", lr=1.6,
                 weight_decay=1.5e-6, barlow_lambda=0.01, knn_k=7)
    local = build_local_modules(cfg, 1, 10, 8)
    steps = build_stage_steps(cfg, local, steps_per_epoch=10)
    assert all(isinstance(s, BarlowTwinsStep) and isinstance(s.head, ProjectorHead) for s in steps)
    assert (steps[1].off_diagonal_weight, steps[1].knn_k, steps[1].lam) == (0.01, 7, 1.0)
    assert steps[1].needs_delta and steps[0].send_delta  # SGR reconciles the Barlow Twins losses' gradients
    weights, others = steps[0].optimizer.param_groups
    assert isinstance(steps[0].optimizer, LARS) and weights["lars"] and not others["lars"]
    assert all(p.dim() > 1 for p in weights["params"]) and all(p.dim() == 1 for p in others["params"])
    assert others["lr_ratio"] == BIAS_LR_RATIO and weights["weight_decay"] == 1.5e-6


def test_configure_torch_makes_an_indexed_gpu_the_current_one_and_leaves_the_rest(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)  # no GPU here: the decision, not the call
    for device in (None, torch.device("cpu"), torch.device("cuda"), torch.device("cuda:1")):
        configure_torch(Config(), device)
    assert chosen == [torch.device("cuda:1")]  # pinned memory and new streams then land on GPU 1, not GPU 0


@pytest.mark.parametrize("tf32", [False, True])
def test_configure_torch_lets_gpu_convolutions_and_matrix_products_use_tf32_only_when_asked(tf32):
    configure_torch(Config(tf32=not tf32))
    configure_torch(Config(tf32=tf32))
    assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cuda.matmul.allow_tf32 is tf32


def test_the_test_session_fixes_the_cublas_workspace_before_any_test_runs_a_matrix_product():
    # the two settings cuBLAS repeats to the bit with; it reads them once per process (tests/conftest.py)
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")


def test_model_args_another_model_takes_are_named_with_the_ones_this_model_takes():
    assert model_args_of("vgg17") == ["widths"] and model_args_of("resnet32") == ["width", "residual"]
    assert model_args_of("tv_resnet50") is None and model_args_of("nonsense") is None  # passes any on; unknown
    with pytest.raises(ConfigError, match=r"model 'vgg17' takes no model_args \['width'\]; its model_args are "
                                          r"\['widths'\]: set them, e.g. --set model_args=\{\}"):
        build_net(Config(model="vgg17", model_args={"width": 16}), 3, 10, 32)  # the default config's width


@pytest.mark.parametrize("message,said", [
    ("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried", True),
    ("a bug", False),
])
def test_a_model_too_big_for_memory_is_a_config_error_and_other_runtime_errors_stay_bugs(monkeypatch, message, said):
    def failing(*_args, **_kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr("pipeline.stages.build_network", failing)
    expected = (ConfigError, "model 'resnet8' with model_args {} does not fit in this machine's memory") if said else \
        (RuntimeError, "a bug")
    with pytest.raises(expected[0]) as err:
        build_net(Config(model_args={}), 1, 10, 8)
    assert str(err.value).startswith(expected[1])
