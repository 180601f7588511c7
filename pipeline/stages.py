"""From a config to K (module, head) pairs and their StageSteps: the model as local modules."""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.config import Config, ConfigError, barlow_twins_losses, infopro_losses
from pipeline.bpfree import BPFREE_METHODS, NEEDS_OUTPUT_ERROR
from pipeline.heads import Decoder, InfoProHead, build_head, feature_channels
from pipeline.losses import infopro_coefficients, infopro_weights
from pipeline.models import DenseLayer, Network, ends_in_relu
from pipeline.registry import build_network, model_args_of
from pipeline.splits import SplitError, module_ranges, resolve_cuts
from pipeline.lars import LARS, split_for_lars
from pipeline.step import BarlowTwinsStep, DeltaFlow, InfoProStep, SignalStep, StageStep, delta_flow


@dataclass
class LocalModule:
    """One gradient-isolated module and its local head."""

    module: nn.Sequential
    head: nn.Module


def build_net(cfg: Config, in_channels: int, num_classes: int, input_size: int) -> Network:
    """The network of the config, with one-line errors for bad model names or arguments."""
    try:
        return build_network(cfg.model, in_channels, num_classes, input_size, **cfg.model_args)
    except (ValueError, TypeError) as err:
        takes = model_args_of(cfg.model)
        unknown = sorted(set(cfg.model_args) - set(takes)) if takes is not None else []
        if unknown:  # e.g. the default config's `width` (a ResNet's) with --model vgg17
            raise ConfigError(f"model {cfg.model!r} takes no model_args {unknown}; its model_args are "
                              f"{takes or 'none'}: set them, e.g. --set model_args={{}}") from None
        raise ConfigError(f"model {cfg.model!r} with model_args {cfg.model_args}: {err}") from None
    except (RuntimeError, MemoryError) as err:  # torch's allocator fails with a RuntimeError; anything else is a bug
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        raise ConfigError(f"model {cfg.model!r} with model_args {cfg.model_args} does not fit in this machine's "
                          f"memory ({str(err).splitlines()[0][:160]}); make it smaller") from None


def feature_layout(cfg: Config, in_channels: int, num_classes: int, input_size: int) -> str:
    """How the config's network lays out its features (nchw, flat, tokens, nhwc), without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        return build_net(cfg, in_channels, num_classes, input_size).layout


def module_cuts(cfg: Config, net: Network) -> list[int]:
    """Cut points for the config's method and split (global BP and 'whole' train one module)."""
    if cfg.method == "bp":
        return []
    try:
        return resolve_cuts(net.resolution, cfg.stages, cfg.split)
    except SplitError as err:
        raise ConfigError(f"{err} (model {cfg.model})") from None


def split_cuts(cfg: Config, in_channels: int, num_classes: int, input_size: int) -> list[int]:
    """The unit indices where the config's modules start (without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        return module_cuts(cfg, build_net(cfg, in_channels, num_classes, input_size))


def cuts_of(local: list[LocalModule]) -> list[int]:
    """The cut points a list of modules was made with: where each module after the first starts."""
    return list(itertools.accumulate(len(lm.module) for lm in local[:-1]))


def unit_outputs(net: Network, in_channels: int, input_size: int) -> list[torch.Tensor]:
    """Every unit's output on a dummy batch of 2 (eval mode, no RNG drawn): the shapes heads are built for."""
    x = torch.zeros(2, in_channels, input_size, input_size)
    outputs = []
    with torch.no_grad():
        for unit in net.units:
            unit.eval()
            x = unit(x)
            outputs.append(x)
    return outputs


def local_module(cfg: Config, net: Network, units: range, example_out: torch.Tensor, num_classes: int,
                 k: int, is_last: bool, image_channels: int) -> LocalModule:
    """Module k (0-based) made of the network's `units`, with the config's local head for its output (and, with
    InfoPro's loss, a decoder of the `image_channels` input image beside the head, except in the last module)."""
    module = nn.Sequential(*(net.units[i] for i in units))
    kind = cfg.last_head if is_last else cfg.head
    if kind == "own":
        if not is_last:
            raise ConfigError("head 'own' (the network's classifier) is only for the last module")
        return LocalModule(module, net.classifier)
    channels = feature_channels(example_out, net.layout)
    try:
        width = cfg.projector_width if kind == "projector" else cfg.head_width
        head = build_head(kind, channels, num_classes, width=width, seed=cfg.seed + k, layout=net.layout)
    except ValueError as err:
        raise ConfigError(f"head of module {k + 1}: {err}") from None
    if infopro_losses(cfg) and not is_last:
        if net.layout != "nchw":
            raise ConfigError(f"InfoPro's decoder reconstructs the image from conv feature maps; model {cfg.model}'s "
                              f"features are {net.layout}: use a conv net (resnet, plainnet, vgg)")
        head = InfoProHead(head, Decoder(channels, image_channels, cfg.decoder_width, cfg.decoder_upsampling))
    return LocalModule(module, head)


def build_local_modules(cfg: Config, in_channels: int, num_classes: int, input_size: int) -> list[LocalModule]:
    """The config's network cut into local modules with their heads, initialised from cfg.seed.

    Every process that calls this with the same config gets the same weights, so a pipeline
    stage can build the whole model and keep its own module.
    """
    torch.manual_seed(cfg.seed)
    net = build_net(cfg, in_channels, num_classes, input_size)
    check_layout(cfg, net)
    outputs = unit_outputs(net, in_channels, input_size)
    ranges = module_ranges(module_cuts(cfg, net), len(net.units))
    if infopro_losses(cfg):
        infopro_schedule(cfg, len(ranges))  # unpublished K without infopro_lambdas: refused before anything trains
    local = [local_module(cfg, net, units, outputs[units[-1]], num_classes, k, k == len(ranges) - 1, in_channels)
             for k, units in enumerate(ranges)]
    if cfg.method in BPFREE_METHODS:
        check_bpfree(cfg, local)
    return local


def check_layout(cfg: Config, net: Network) -> None:
    """channels_last only applies to conv nets (NCHW feature maps)."""
    if cfg.channels_last and net.layout != "nchw":
        raise ConfigError(f"channels_last is for conv nets; model {cfg.model}'s features are {net.layout}: set channels_last: false")


def lr_factor(cfg: Config, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at a training step: linear warm-up, then cosine, step or constant."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
    return 1.0


def build_optimizer(cfg: Config, local: LocalModule, steps_per_epoch: int, epochs: int):
    """The config's optimizer (SGD with momentum, AdamW or LARS) on a module and its head, and its per-step schedule."""
    params = [p for p in (*local.module.parameters(), *local.head.parameters()) if p.requires_grad]
    if cfg.optimizer == "lars":
        optimizer = LARS(split_for_lars(params), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         eta=cfg.lars_eta)
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    total = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, total, steps_per_epoch))
    return optimizer, scheduler


def method_lambda(cfg: Config) -> float:
    """The λ a method trains with: the config's for sgr, 0 for every other method."""
    return cfg.lam if cfg.method == "sgr" else 0.0


def check_bpfree(cfg: Config, local: list[LocalModule]) -> None:
    """FA, DFA and DRTP train a network of single layers: one unit per module (and linear layers for FA)."""
    for k, lm in enumerate(local):
        if len(lm.module) != 1:
            raise ConfigError(f"method {cfg.method} trains one layer per module but module {k + 1} holds "
                              f"{len(lm.module)} units: use split: per_block")
        if cfg.method == "fa" and not isinstance(lm.module[0], DenseLayer):
            raise ConfigError("method fa feeds the error back through fixed matrices in place of linear weights: "
                              "use an mlp<depth> model")
        if cfg.method == "pepita" and not ends_in_relu(lm.module[0]):
            raise ConfigError(f"method pepita updates each layer at the input of its ReLU, but module {k + 1} is a "
                              f"{type(lm.module[0]).__name__}: use an mlp<depth> or plainconv<depth> model")


def build_stage_steps(cfg: Config, local: list[LocalModule], steps_per_epoch: int) -> list[StageStep]:
    """A StageStep per module, each with its own optimizer and schedule (SignalSteps for BP-free baselines' layers)."""
    return [build_stage_step(cfg, lm, k, len(local), steps_per_epoch) for k, lm in enumerate(local)]


def infopro_schedule(cfg: Config, k_total: int) -> tuple[float, ...]:
    """InfoPro's (λ1 first, λ2 first, λ1 last, λ2 last) for K modules: the config's, else the published ones."""
    try:
        return infopro_coefficients(k_total, cfg.infopro_lambdas)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def module_flow(cfg: Config, k: int, k_total: int) -> DeltaFlow:
    """What module k (0-based) of k_total takes and passes on (δ, the input image) under the config's method."""
    return delta_flow(method_lambda(cfg), tracks_sgr(cfg), k, k_total, images=infopro_losses(cfg))


def tracks_sgr(cfg: Config) -> bool:
    """Whether the modules measure the SGR term: `track_sgr`, except for the BP-free baselines' layers (they pass no
    δ to compare with)."""
    return cfg.track_sgr and cfg.method not in BPFREE_METHODS


def build_stage_step(cfg: Config, lm: LocalModule, k: int, k_total: int, steps_per_epoch: int) -> StageStep:
    """The StageStep of module k (0-based) of k_total: its optimizer, schedule, λ and what it passes on."""
    flow = module_flow(cfg, k, k_total)
    optimizer, scheduler = build_optimizer(cfg, lm, steps_per_epoch, cfg.epochs)
    if cfg.method in NEEDS_OUTPUT_ERROR or (cfg.method == "drtp" and k < k_total - 1):
        return SignalStep(lm.module, lm.head, optimizer, scheduler, method=cfg.method,
                          num_classes=lm.head.frame.shape[1], seed=1000 * cfg.seed + k,
                          is_first=k == 0, is_last=k == k_total - 1)
    kind, extra = StageStep, {}
    if flow.needs_image:
        kind, extra = InfoProStep, {"weights": infopro_weights(k, k_total, infopro_schedule(cfg, k_total))}
    elif barlow_twins_losses(cfg):
        kind, extra = BarlowTwinsStep, {"off_diagonal_weight": cfg.barlow_lambda, "knn_k": cfg.knn_k}
    return kind(
        lm.module, lm.head, optimizer, scheduler,
        lam=flow.lam,
        is_first=k == 0,
        is_last=k == k_total - 1,
        send_delta=flow.sends_delta,
        reforward=cfg.method == "reforward",
        sgr_reduction=cfg.sgr_reduction,
        track_sgr=tracks_sgr(cfg),
        amp=cfg.amp == "bf16",
        channels_last=cfg.channels_last,
        rng_seed=2**40 + 1000 * cfg.seed + k,  # dropout / stochastic depth: module k's own stream
        wire_dtype=wire_dtype(cfg),
        **extra,
    )


def configure_torch(cfg: Config, device: torch.device | None = None) -> None:
    """Process-wide torch settings of a run; call before the first CUDA work.

    `deterministic`: only deterministic kernels (an op without one raises, naming itself), and the
    cuBLAS workspace that makes matrix products repeat to the bit. Needed for a GPU pipeline to
    equal the sequential reference to the bit; on the CPU the kernels already are deterministic.
    The cuBLAS setting is read once, at a process's first matrix product: a process that already
    ran one (a notebook, a test session) must set CUBLAS_WORKSPACE_CONFIG itself.
    `tf32`: whether fp32 convolutions and matrix products on a GPU may use TF32; off, they are
    IEEE fp32 as on the CPU (PyTorch's own default lets cuDNN's convolutions use TF32).
    A `device` cuda:N becomes the current GPU: work that names no index (pinned memory, a new
    stream, a CUDA context) then lands on N, not on GPU 0.
    """
    torch.backends.cudnn.allow_tf32 = cfg.tf32  # the legacy switches: after fp32_precision was set, reading them raises
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if device is not None and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def wire_dtype(cfg: Config) -> torch.dtype:
    """The dtype of the activations and δ passed between modules: the compute dtype unless `wire_fp32` asks for fp32.

    Under bf16 autocast a module's output is already bf16; casting it to fp32 would double what
    every message and every in-flight slot holds without adding information.
    """
    return torch.bfloat16 if cfg.amp == "bf16" and not cfg.wire_fp32 else torch.float32
