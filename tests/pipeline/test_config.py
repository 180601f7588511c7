from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, changed_settings, from_dict, load_yaml, parse_override, validate
from pipeline.stages import build_local_modules

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_validates_and_builds(path):
    cfg = validate(load_yaml(path))
    in_ch, size, classes = {"fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100)}[cfg.dataset]
    modules = build_local_modules(cfg, in_ch, classes, size)
    assert len(modules) == (1 if cfg.method == "bp" else cfg.stages)


BARLOW = {"local_loss": "barlow_twins", "head": "projector", "last_head": "projector", "augment": True, "probe_size": 0}  # a valid Barlow Twins config's keys


@pytest.mark.parametrize(
    "values,message",
    [
        ({"methd": "sgr"}, "unknown key 'methd'"),
        ({"method": "dgl"}, "unknown method 'dgl'"),
        ({"lam": -1.0}, "lam must be >= 0"),
        ({"stages": 0}, "stages must be >= 1"),
        ({"epochs": "ten"}, "'epochs' must be an integer"),
        ({"augment": 1}, "'augment' must be true or false"),
        ({"head": "own"}, "head must be conv_linear, etf, token_linear or projector"),
        ({"sgr_reduction": "sum"}, "sgr_reduction must be mean or sample"),
        ({"device": "tpu"}, "device must be cpu, cuda or cuda:N"),
        ({"device": "cuda:00"}, "device must be cpu, cuda or cuda:N"),  # a string the launcher would match to no GPU
        ({"tf32": "yes"}, "'tf32' must be true or false"),
        ({"optimizer": "lamb"}, "optimizer must be one of sgd, adamw"),
        ({"amp": "fp16"}, "amp must be one of fp32, bf16"),
        ({"lr": None}, "config key 'lr' needs a value, got null"),
        ({"lam": None}, "config key 'lam' needs a value, got null"),
        ({"out": None}, "config key 'out' needs a value, got null"),
        ({"lr": float("inf")}, "config key 'lr' must be a finite number, got inf"),
        ({"lam": float("inf")}, "config key 'lam' must be a finite number, got inf"),
        ({"peer_timeout": float("inf")}, "config key 'peer_timeout' must be a finite number"),
        ({"peer_timeout": 10.0}, r"peer_timeout \(10 s\) must be longer than heartbeat_timeout \(20 s\)"),
        ({"lr": float("nan")}, "config key 'lr' must be a finite number, got nan"),
        ({"epochs": True}, "config key 'epochs' must be an integer, got True"),
        ({"threads": 1.5}, "config key 'threads' must be an integer, got 1.5"),
        ({"gpus": [0, True]}, "config key 'gpus' must be a list of integers"),
        ({"image_size": 0}, "image_size must be >= 8 pixels, got 0"),
        ({"model_args": {"width": 0}}, r"model_args \{'width': 0\}: sizes and counts must be >= 1"),
        ({"model_args": {"widths": [-4, 8]}}, "sizes and counts must be >= 1"),
        ({"local_loss": "mse"}, "local_loss must be one of cross_entropy, infopro, barlow_twins"),
        ({**BARLOW, "method": "infopro"}, "local_loss barlow_twins is for methods sgr, layerwise and bp"),
        ({**BARLOW, "last_head": "own"}, "set head: projector and last_head: projector"),
        ({**BARLOW, "augment": False}, "two augmented views of each image: set augment: true"),
        ({**BARLOW, "probe_size": 64}, "set probe_size: 0"),
        ({**BARLOW, "replicas": [1, 2, 1]}, "a replica's shard would split: set replicas: 1"),
        ({**BARLOW, "knn_k": 0}, "projector_width, knn_bank and knn_k must be >= 1"),
        ({"head": "projector"}, "head projector is for local_loss barlow_twins"),
        ({**BARLOW, "photometric": "byol"}, "photometric must be one of none, barlow_twins, got 'byol'"),
        ({"photometric": "barlow_twins", "augment": True}, "it needs local_loss barlow_twins"),
        ({"optimizer": "lamb"}, "optimizer must be one of sgd, adamw, lars"),
        ({"lars_eta": 0.0}, "lars_eta > 0"),
        ({"optimizer": "lars", "nesterov": True}, "optimizer lars uses heavy-ball momentum: set nesterov: false"),
        ({"local_loss": "infopro", "method": "reforward"}, "local_loss infopro is for methods sgr, layerwise"),
        ({"infopro_lambdas": [1, 2]}, "infopro_lambdas must be \\[\\] or four weights"),
        ({"infopro_lambdas": [1, 2, -3, 4]}, "infopro_lambdas must be"),
        ({"decoder_upsampling": "bicubic"}, "decoder_upsampling must be one of bilinear, nearest"),
        ({"method": "infopro", "deterministic": True, "device": "cuda"},
         "InfoPro's bilinear upsampling has no deterministic CUDA backward: set decoder_upsampling: nearest"),
    ],
)
def test_bad_values_fail_with_one_clear_line(values, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(from_dict(values))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"model": "resnet32", "stages": 17}, "stages=17 is out of range: this model has 16 units"),
        ({"model": "resnet30"}, "6n\\+2"),
        ({"model": "alexnet"}, "unknown model 'alexnet'"),
        ({"model": "resnet8", "model_args": {"blocks": 3}},
         r"takes no model_args \['blocks'\]; its model_args are \['width', 'residual'\]"),
        ({"model": "resnet32", "stages": 2, "split": [4, 8]}, "gives 3 modules but stages=2"),
        ({"model": "resnet32", "stages": None, "split": [0, 8]}, "out of range"),
        ({"model": "vit_s16", "head": "token_linear", "method": "infopro", "stages": 2}, "InfoPro's decoder reconstructs"),
        ({"model": "resnet32", "method": "infopro", "stages": 5}, "give infopro_lambdas"),
    ],
)
def test_model_and_split_errors_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        build_local_modules(validate(from_dict(values)), 3, 10, 32)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")


def test_overrides_are_parsed_as_yaml_values():
    assert parse_override("split=[6, 11]") == ("split", [6, 11])
    assert parse_override("lr=0.05") == ("lr", 0.05)
    cfg = from_dict(dict([parse_override("lam=10")]))
    assert cfg.lam == 10.0 and isinstance(cfg.lam, float)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("lr")


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible; use --device cpu"):
        validate(Config(device="cuda"))


def test_numbers_in_scientific_notation_are_numbers_though_yaml_1_1_reads_them_as_text():
    cfg = from_dict({"lr": "1e-3", "weight_decay": "5E-4", "lam": "+2.5e1"})
    assert (cfg.lr, cfg.weight_decay, cfg.lam) == (0.001, 0.0005, 25.0)
    assert from_dict({"infopro_lambdas": ["1e-3", 1.0], "simulate_step_ms": ["2e1", 5]}).infopro_lambdas == [0.001, 1.0]
    assert from_dict({"simulate_step_ms": ["2e1", 5]}).simulate_step_ms == [20.0, 5]
    with pytest.raises(ConfigError, match="config key 'lr' must be a number, got '1e-3x'"):
        from_dict({"lr": "1e-3x"})
    with pytest.raises(ConfigError, match="config key 'epochs' must be an integer, got '1e1'"):
        from_dict({"epochs": "1e1"})  # only where a float is declared


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder, not a file"):
        load_yaml(tmp_path)


def test_changed_settings_lists_every_other_value_but_the_run_directory():
    before = Config()
    assert changed_settings(before, from_dict({"out": "elsewhere", "replicas": "auto"}, base=before)) == {}
    after = from_dict({"lr": 0.05, "split": [2, 4], "out": "elsewhere"}, base=before)
    assert changed_settings(before, after) == {"lr": (0.1, 0.05), "split": (before.split, [2, 4])}
    zmq = from_dict({"transport": "zmq"}, base=before)  # a setting whose `auto` is no plan
    assert changed_settings(zmq, before) == {"transport": ("zmq", "auto")}
