"""Run configuration: one flat dataclass, loaded from YAML, overridden from the CLI, validated up front.

Every mistake a user can make in a config is caught by `validate` with one line that names
the key and says how to fix it, before any data is read or any training starts.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.bpfree import BPFREE_METHODS
from pipeline.sgr import REDUCTIONS
from pipeline.views import PHOTOMETRIC

METHODS = ("sgr", "layerwise", "bp", "reforward", "greedy", "infopro", *BPFREE_METHODS)
LOCAL_LOSSES = ("cross_entropy", "infopro", "barlow_twins")
UPSAMPLING = ("bilinear", "nearest")  # InfoPro's two decoder modes
HEADS = ("conv_linear", "etf", "token_linear", "projector", "own")
LR_SCHEDULES = ("cosine", "step", "constant")
SCHEDULES = ("pipeline", "sequential")
TRANSPORTS = ("auto", "zmq")
OPTIMIZERS = ("sgd", "adamw", "lars")
PRECISIONS = ("fp32", "bf16")
CONFIG_REDUCTIONS = tuple(r for r in REDUCTIONS if r != "none")  # "none" (per-sample distances) is for analyses


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the problem and its fix."""


@dataclass
class Config:
    # data
    dataset: str = "fashion_mnist"  # fashion_mnist | digits | cifar10 | cifar100 | imagefolder | synthetic
    data_dir: str | None = None  # None: the dataset's default location
    image_size: int = 32  # imagefolder: training crops and evaluation centre crops have this size
    loader_workers: int = 4  # imagefolder: processes decoding images for the first stage (0: decode in the stage)
    train_subset: int = 0  # use only the first N training samples (0: all)
    augment: bool = False  # random crop (pad 4) + horizontal flip; imagefolder: RandomResizedCrop + flip of the original
    photometric: str = "none"  # with augment: each view's colour recipe, none | barlow_twins (jitter, blur, solarise)
    batch_size: int = 128
    eval_batch_size: int = 1000
    # model and split
    model: str = "resnet8"  # family + depth: resnet32, plainnet32, vgg17, ...
    model_args: dict[str, Any] = field(default_factory=dict)  # e.g. {width: 16} or {widths: [64, 128]}
    stages: int | None = 3  # K; None: take it from `split`
    split: str | list[int] | None = None  # named split, cut points, or auto (least memory, measured); None: the paper's split for K
    profile_batch: int = 4  # split auto: the profiling pass measures at this batch and the next, extrapolates to batch_size
    # local head of modules 1..K-1: conv_linear | etf (conv maps), token_linear (ViT, Swin), projector (barlow_twins)
    head: str = "conv_linear"
    last_head: str = "own"  # head of module K ('own' = the network's classifier)
    head_width: int = 0  # conv_linear head channels (0: the module's channels)
    # method
    method: str = "sgr"
    lam: float = 1.0  # λ of the SGR term (only method sgr uses it)
    sgr_reduction: str = "mean"  # mean (paper) | sample (independent of the feature size)
    track_sgr: bool = False  # with λ = 0, still measure the SGR term (one extra backward per module)
    # each module's loss: cross_entropy | infopro (method infopro implies it) | barlow_twins
    local_loss: str = "cross_entropy"
    infopro_lambdas: list[float] = field(default_factory=list)  # InfoPro's [λ1 first, λ2 first, λ1 last, λ2 last] ([]: published for K)
    decoder_width: int = 12  # InfoPro: channels of the decoder's hidden conv
    decoder_upsampling: str = "bilinear"  # InfoPro: bilinear (the authors' default) | nearest (deterministic on CUDA)
    projector_width: int = 512  # Barlow Twins: width of the projector head's three linear layers (the paper: 8192)
    barlow_lambda: float = 0.0051  # Barlow Twins: weight of the off-diagonal (redundancy) term (the paper's λ)
    knn_bank: int = 5000  # Barlow Twins: training images (a fixed seeded draw) k-NN compares the test images with
    knn_k: int = 20  # Barlow Twins: neighbours that vote in k-NN evaluation
    # optimisation (each module has its own optimizer and schedule)
    # sgd (momentum, nesterov) | adamw (betas 0.9/0.999; momentum and nesterov unused) | lars (momentum)
    optimizer: str = "sgd"
    lars_eta: float = 0.001  # LARS: the trust coefficient η (update norm η·‖w‖ per weight tensor)
    epochs: int = 2
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lr_schedule: str = "cosine"  # cosine | step | constant, stepped every batch
    lr_milestones: list[int] = field(default_factory=list)  # step schedule: epochs where lr *= lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    # run
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads (0: leave PyTorch's default)
    amp: str = "fp32"  # fp32 | bf16: each module's forward and losses under bfloat16 autocast (gradients, SGR fp32)
    wire_fp32: bool = False  # amp bf16: pass activations and δ between modules in fp32 instead of bf16
    deterministic: bool = False  # deterministic kernels (torch.use_deterministic_algorithms): GPU runs repeat to the bit
    tf32: bool = False  # GPU: fp32 convolutions and matrix products may use TF32 (faster; 10-bit mantissa, not 23)
    channels_last: bool = False  # conv nets: keep feature maps NHWC in memory (faster convolutions on GPUs)
    schedule: str = "pipeline"  # pipeline: one process per module; sequential: the single-process reference
    depth: int = 2  # pipeline: messages a stage may send ahead of the next stage's progress
    transport: str = "auto"  # auto: on one host CUDA IPC (where the GPU is visible) or shared memory, else zmq; zmq: always zmq
    trace: bool = False  # pipeline: write RUN_DIR/trace.json, when each stage trained, waited, sent (launch.py trace RUN_DIR)
    gpus: list[int] = field(default_factory=list)  # pipeline on cuda: GPU of each process (default: process i on i mod #GPUs)
    replicas: int | list[int] | str = 1  # pipeline: processes per stage (one count, one per stage, or auto: planned), each on a shard of every batch
    sync_bn: bool = True  # replicas: BatchNorm statistics over the stage's whole batch (false: per shard, as plain DDP)
    allreduce_gbps: float = 0.0  # planner: the replicas' all-reduce bus bandwidth, GB/s (bench/allreduce.py; 0: left out)
    checksum_every: int = 100  # replicas: steps between comparing the replicas' weights (0: never)
    peer_timeout: float = 120.0  # pipeline: seconds without a message from a neighbour before it counts as dead
    simulate_step_ms: float | list[float] = 0.0  # pipeline benchmark: each stage sleeps this long (or a list: per stage) instead of training (0: off)
    heartbeat_timeout: float = 20.0  # pipeline: seconds without a heartbeat (sent once a second by a thread) before a stage counts as hung
    out: str = "runs/default"
    log_every: int = 20  # steps between JSONL training records
    tensorboard: bool = True  # also write TensorBoard event files, when tensorboard is installed
    eval_every: int = 0  # steps between evaluations of every head (0: at the end of each epoch)
    probe_size: int = 256  # training samples in the fixed probe batch of the ΔL_k analysis (0: off)
    checkpoint_every: int = 0  # steps between checkpoints (0: at the end of each epoch); the last step always
    keep_checkpoints: int = 2  # newest checkpoints kept (the best by test accuracy is kept too)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


UNIONS = {"replicas": (int, list), "simulate_step_ms": (float, int, list)}  # keys that take one value or one per stage


def per_stage(value: int | float | list, stages: int, key: str) -> list:
    """A key given as one value for every stage, or as a list of one per stage: the list of K values."""
    values = list(value) if isinstance(value, list) else [value] * stages
    if len(values) != stages:
        raise ConfigError(f"{key} lists {len(values)} values but the split has {stages} stages; give one per stage")
    return values


def _values(value: Any) -> list:
    """A one-or-per-stage key's values as a list."""
    return value if isinstance(value, list) else [value]


def _coerce(name: str, value: Any) -> Any:
    """Check a value's type against the field's: no null where a value is needed, no bool for a number, finite
    floats (ints allowed), ints in int lists; one line naming the key otherwise."""
    default, declared = getattr(Config(), name), str(FIELDS[name].type)
    if value is None:
        if "None" in declared or default is None:
            return value
        raise ConfigError(f"config key '{name}' needs a value, got null (leave the key out for its default {default!r})")
    if default is None:
        return value
    if "float" in declared:  # a float, or floats in a list: scientific notation is a number (see _number)
        value = [_number(v) for v in value] if isinstance(value, list) else _number(value)
    if name == "replicas" and value == "auto":
        return value
    if name in UNIONS:
        items = _values(value)
        element = UNIONS[name][:-1]  # int, or float (ints allowed)
        if isinstance(value, bool) or not items or not all(isinstance(v, element) and not isinstance(v, bool) for v in items):
            also = " or auto" if name == "replicas" else ""
            raise ConfigError(f"config key '{name}' must be {KIND_NAMES[element[0]]} or a list of them (one per stage)"
                              f"{also}, got {value!r}")
        return value
    kind = KIND_NAMES.get(type(default), type(default).__name__)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{name}' must be true or false, got {value!r}")
        return value
    if isinstance(value, bool):  # YAML's true is an int to Python; never a number here
        raise ConfigError(f"config key '{name}' must be {kind}, got {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if isinstance(default, (int, float, str, dict, list)) and not isinstance(value, type(default)):
        raise ConfigError(f"config key '{name}' must be {kind}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{name}' must be a finite number, got {value!r}")
    if isinstance(value, list) and name in INT_LISTS and not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"config key '{name}' must be a list of integers, got {value!r}")
    return value


def _number(value: Any) -> Any:
    """A string in scientific notation as the float it is (YAML 1.1, PyYAML's, reads 1e-3 as text: it wants 1.0e-3)."""
    return float(value) if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()) else value


INT_LISTS = ("gpus", "lr_milestones")
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
KIND_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "a mapping", list: "a list"}


def from_dict(values: dict[str, Any], base: Config | None = None, source: str = "config") -> Config:
    """A Config from a mapping; unknown keys are an error that lists the known ones."""
    cfg = dataclasses.replace(base) if base is not None else Config()
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown key '{key}' in {source}; known keys: {', '.join(FIELDS)}")
        setattr(cfg, key, _coerce(key, value))
    return cfg


def load_yaml(path: str | Path) -> Config:
    """Load a YAML run config."""
    return from_dict(read_yaml_mapping(path), source=str(path))


PLANNED = ("replicas", "split")  # keys whose `auto` is planned when a run starts, and recorded as the plan's values


def changed_settings(before: Config, after: Config) -> dict[str, tuple[Any, Any]]:
    """The settings `after` gives other values than `before`: {key: (before's, after's)}, the run directory aside, and
    a PLANNED key given as `auto` (its plan is made later)."""
    old, new = before.to_dict(), after.to_dict()
    return {key: (old[key], value) for key, value in new.items()
            if key != "out" and not (key in PLANNED and value == "auto") and old[key] != value}


def read_yaml_mapping(path: str | Path, kind: str = "config file", example: str = "configs/default.yaml") -> dict:
    """The key: value mapping of a YAML file (a `kind` such as a config or a study file); one-line ConfigError for a
    folder, a missing, binary or malformed file, or one that holds no mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{kind} {path} is a folder, not a file; give a YAML file (e.g. {example})")
    if not path.is_file():
        raise ConfigError(f"{kind} {path} not found; pick one from {Path(example).parent}/ (e.g. {example})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{kind} {path} is not text (binary bytes); give a YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{kind} {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise ConfigError(f"{kind} {path} cannot be read: {err.strerror}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{kind} {path} must be a mapping of key: value")
    return values


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a `key=value` CLI override; the value is read as YAML (numbers, lists, true/false)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. lr=0.05")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None


def infopro_losses(cfg: Config) -> bool:
    """Whether the modules train on InfoPro's losses (method infopro, or `local_loss: infopro`), so the input images
    travel with the batches."""
    return cfg.method == "infopro" or cfg.local_loss == "infopro"


def barlow_twins_losses(cfg: Config) -> bool:
    """Whether the modules train on Barlow Twins' loss: batches carry two augmented views of each image."""
    return cfg.local_loss == "barlow_twins"


def views_per_image(cfg: Config) -> int:
    """Rows per image in a training batch: 2 for Barlow Twins (rows i and N + i are views of one image), else 1."""
    return 2 if barlow_twins_losses(cfg) else 1


def knn_bank_size(cfg: Config) -> int:
    """Training images in the k-NN bank each evaluation builds first: Barlow Twins' modules only (0: none)."""
    return cfg.knn_bank if barlow_twins_losses(cfg) else 0


def _has_non_positive_int(value: Any) -> bool:
    """Whether a model argument is (or lists) an integer below 1: no width, depth or count can be."""
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values)


def validate(cfg: Config) -> Config:
    """Check every value that does not need the data or the model; raise ConfigError on the first problem."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(cfg.method in METHODS, f"unknown method {cfg.method!r}; use one of {', '.join(METHODS)}")
    need(cfg.lam >= 0, f"lam must be >= 0, got {cfg.lam}")
    need(cfg.local_loss in LOCAL_LOSSES, f"local_loss must be one of {', '.join(LOCAL_LOSSES)}, got {cfg.local_loss!r}")
    need(cfg.local_loss != "infopro" or cfg.method in ("sgr", "layerwise", "infopro"),
         f"local_loss infopro is for methods sgr, layerwise and infopro, not {cfg.method}")
    need(cfg.local_loss != "barlow_twins" or cfg.method in ("sgr", "layerwise", "bp"),
         f"local_loss barlow_twins is for methods sgr, layerwise and bp, not {cfg.method}")
    if barlow_twins_losses(cfg):
        need((cfg.head, cfg.last_head) == ("projector", "projector"),
             "local_loss barlow_twins trains every module through a projector: set head: projector and last_head: projector")
        need(cfg.augment, "local_loss barlow_twins compares two augmented views of each image: set augment: true")
        need(cfg.probe_size == 0, "the ΔL_k probe measures cross entropy, which barlow_twins modules have not: set probe_size: 0")
        need(cfg.replicas != "auto" and max(_values(cfg.replicas)) == 1,
             "barlow_twins correlates the two views over the whole batch, which a replica's shard would split: "
             "set replicas: 1")
        need(cfg.projector_width >= 1 and cfg.knn_bank >= 1 and cfg.knn_k >= 1,
             "projector_width, knn_bank and knn_k must be >= 1")
    else:
        need("projector" not in (cfg.head, cfg.last_head), "head projector is for local_loss barlow_twins; "
                                                            "use conv_linear, etf or token_linear")
    need(cfg.photometric in PHOTOMETRIC,
         f"photometric must be one of {', '.join(PHOTOMETRIC)}, got {cfg.photometric!r}")
    need(cfg.photometric == "none" or barlow_twins_losses(cfg),
         f"photometric {cfg.photometric} gives each of Barlow Twins' two views its own recipe: it needs local_loss "
         "barlow_twins")
    need(cfg.barlow_lambda >= 0 and cfg.lars_eta > 0, "barlow_lambda must be >= 0 and lars_eta > 0")
    need(not (cfg.optimizer == "lars" and cfg.nesterov), "optimizer lars uses heavy-ball momentum: set nesterov: false")
    need(len(cfg.infopro_lambdas) in (0, 4) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                                     for v in cfg.infopro_lambdas),
         f"infopro_lambdas must be [] or four weights >= 0 [λ1 first, λ2 first, λ1 last, λ2 last], got {cfg.infopro_lambdas}")
    need(cfg.decoder_width >= 1, f"decoder_width must be >= 1, got {cfg.decoder_width}")
    need(cfg.decoder_upsampling in UPSAMPLING,
         f"decoder_upsampling must be one of {', '.join(UPSAMPLING)}, got {cfg.decoder_upsampling!r}")
    need(not (infopro_losses(cfg) and cfg.deterministic and cfg.device.startswith("cuda")
              and cfg.decoder_upsampling == "bilinear"),
         "InfoPro's bilinear upsampling has no deterministic CUDA backward: set decoder_upsampling: nearest "
         "(the authors' other mode) or deterministic: false")
    need(cfg.sgr_reduction in CONFIG_REDUCTIONS, f"sgr_reduction must be {' or '.join(CONFIG_REDUCTIONS)}, "
                                                 f"got {cfg.sgr_reduction!r}")
    need(cfg.head in HEADS and cfg.head != "own",
         f"head must be conv_linear, etf, token_linear or projector, got {cfg.head!r}")
    need(cfg.last_head in HEADS, f"last_head must be one of {', '.join(HEADS)}, got {cfg.last_head!r}")
    need(cfg.method not in BPFREE_METHODS or (cfg.head, cfg.last_head) == ("etf", "etf"),
         f"method {cfg.method} is a BP-free baseline with fixed heads: set head: etf and last_head: etf")
    need(cfg.stages is None or cfg.stages >= 1, f"stages must be >= 1, got {cfg.stages}")
    need(cfg.stages is not None or cfg.split is not None, "give stages: K or a split")
    need(cfg.split is None or isinstance(cfg.split, str) or (isinstance(cfg.split, list) and all(
        isinstance(c, int) and not isinstance(c, bool) for c in cfg.split)),
         f"split must be a name (per_block, auto, ...) or a list of whole cut points like [2, 5], got {cfg.split!r}")
    need(0 <= cfg.seed < 2**32, f"seed must be in 0..{2**32 - 1}, got {cfg.seed}")
    need(cfg.split != "auto" or cfg.stages is not None, "split: auto needs stages: K (the number of modules to plan)")
    need(cfg.split != "auto" or cfg.method not in BPFREE_METHODS,
         f"method {cfg.method} trains one layer per module: use split: per_block, not auto")
    need(cfg.profile_batch >= 2, f"profile_batch must be >= 2 (BatchNorm needs it), got {cfg.profile_batch}")
    need(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    need(cfg.image_size >= 8, f"image_size must be >= 8 pixels, got {cfg.image_size}")
    need(cfg.out.strip() != "", "out is empty: give the run directory, e.g. --out runs/my-run")
    need(cfg.head_width >= 0, f"head_width must be >= 0 (0: the module's channels), got {cfg.head_width}")
    bad_args = {k: v for k, v in cfg.model_args.items() if _has_non_positive_int(v)}
    need(not bad_args, f"model_args {bad_args}: sizes and counts must be >= 1")
    need(cfg.batch_size >= 2, f"batch_size must be >= 2 (BatchNorm needs it), got {cfg.batch_size}")
    need(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    need(cfg.amp in PRECISIONS, f"amp must be one of {', '.join(PRECISIONS)}, got {cfg.amp!r}")
    need(cfg.momentum >= 0 and cfg.weight_decay >= 0, "momentum and weight_decay must be >= 0")
    need(cfg.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    need(cfg.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    need(cfg.train_subset >= 0, f"train_subset must be >= 0, got {cfg.train_subset}")
    need(cfg.loader_workers >= 0, f"loader_workers must be >= 0, got {cfg.loader_workers}")
    need(cfg.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    need(cfg.depth >= 1, f"depth must be >= 1, got {cfg.depth}")
    need(cfg.transport in TRANSPORTS, f"transport must be one of {', '.join(TRANSPORTS)}, got {cfg.transport!r}")
    need(cfg.peer_timeout > 0, f"peer_timeout must be > 0 seconds, got {cfg.peer_timeout}")
    need(cfg.heartbeat_timeout > 0, f"heartbeat_timeout must be > 0 seconds, got {cfg.heartbeat_timeout}")
    # a hung stage must be named by its missing heartbeat before a neighbour gives up waiting on it and is blamed
    need(cfg.peer_timeout > cfg.heartbeat_timeout, f"peer_timeout ({cfg.peer_timeout:g} s) must be longer than "
                                                   f"heartbeat_timeout ({cfg.heartbeat_timeout:g} s)")
    need(min(cfg.eval_every, cfg.checkpoint_every, cfg.probe_size) >= 0,
         "eval_every, checkpoint_every and probe_size must be >= 0 (0: every epoch / off)")
    need(cfg.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    need(min(_values(cfg.simulate_step_ms)) >= 0, f"simulate_step_ms must be >= 0, got {cfg.simulate_step_ms}")
    need(cfg.replicas == "auto" or min(_values(cfg.replicas)) >= 1, f"replicas must be >= 1 (per stage), got {cfg.replicas}")
    need(cfg.allreduce_gbps >= 0, f"allreduce_gbps must be >= 0 (0: the planner leaves the all-reduce out), "
                                  f"got {cfg.allreduce_gbps}")
    need(cfg.checksum_every >= 0, f"checksum_every must be >= 0 (0: never), got {cfg.checksum_every}")
    need(re.fullmatch(r"cpu|cuda(:(0|[1-9]\d*))?", cfg.device) is not None,
         f"device must be cpu, cuda or cuda:N, got {cfg.device!r}")
    need(cfg.threads >= 0 and cfg.log_every >= 1, "threads must be >= 0 and log_every >= 1")
    if cfg.device.startswith("cuda"):
        import torch

        need(torch.cuda.is_available(), f"device {cfg.device} asked for but no CUDA GPU is visible; use --device cpu")
        index = cfg.device.partition(":")[2]
        need(not index or int(index) < torch.cuda.device_count(),
             f"device {cfg.device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        bad = [g for g in cfg.gpus if not 0 <= g < torch.cuda.device_count()]
        need(not bad, f"gpus {bad} do not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        need(cfg.amp != "bf16" or torch.cuda.is_bf16_supported(),
             f"amp: bf16 asked for but the GPU of {cfg.device} has no bfloat16 support (pre-Ampere); use amp: fp32")
    return cfg
