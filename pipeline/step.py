"""One local training step of one module: the exact per-batch update of docs/sgr-method.md.

The same `StageStep` runs in the single-process reference trainer and in a stage process of
the asynchronous pipeline; both call `train_step` on batches in the same order, which is
why the two compute the same numbers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.bpfree import drtp_signal, fa_signal, output_error, pepita_feedback, random_feedback
from pipeline.knn import FeatureBank
from pipeline.losses import barlow_twins_loss, infopro_loss
from pipeline.models import before_relu
from pipeline.sgr import sgr_term


@dataclass(frozen=True)
class DeltaFlow:
    """What module k of K does with δ (the gradient of a module's loss w.r.t. its input) and with the input image."""

    lam: float  # the weight of its SGR term (0: no term)
    needs_delta: bool  # it takes module k-1's δ with its input (for the SGR term, or to measure it)
    sends_delta: bool  # it computes its own δ and passes it to module k+1
    needs_image: bool = False  # InfoPro: its loss reconstructs the input image (every module but the last)
    sends_image: bool = False  # InfoPro: it passes the image on, because module k+1 needs it


def takes_delta(is_first: bool, lam: float, track_sgr: bool) -> bool:
    """Whether a module takes the previous module's δ: not the first module, and only to use or measure SGR."""
    return not is_first and (lam > 0 or track_sgr)


def delta_flow(lam: float, track_sgr: bool, k: int, k_total: int, images: bool = False) -> DeltaFlow:
    """The one decision about δ (and, for InfoPro's losses, `images`, about the input image) for module k (0-based)
    of k_total, given the method's λ and `track_sgr`."""
    return DeltaFlow(lam=0.0 if k == 0 else lam, needs_delta=takes_delta(k == 0, lam, track_sgr),
                     sends_delta=k + 1 < k_total and takes_delta(False, lam, track_sgr),
                     needs_image=images and k < k_total - 1, sends_image=images and k + 1 < k_total - 1)


@dataclass
class StepStats:
    """Statistics of one step, kept as 0-dim tensors so no device sync happens inside the step."""

    loss: torch.Tensor  # the module's local loss (cross entropy of its head, unless another local loss is used)
    sgr: torch.Tensor  # SGR term (0 where the module has none)
    correct: torch.Tensor  # number of samples the local head classified right (0: a module without a classifier)
    count: int  # batch size


@dataclass
class StepOutput:
    """What a module hands to the next one: its detached output and δ, plus its statistics.

    `out` and `delta` are new tensors the step never changes afterwards: a stage may still be sending them while it
    takes its next step (workers/outbox.py)."""

    out: torch.Tensor | None  # detached output (None for the last module)
    delta: torch.Tensor | None  # ∂L_local/∂out, detached (None when the next module needs none)
    stats: StepStats


class StageStep:
    """Trains one module and its local head with its own optimizer and learning-rate schedule.

    lam > 0 adds the SGR term against the δ received from the previous module; lam = 0 is
    non-greedy layer-wise training. `reforward` recomputes the output after the update.
    `amp` runs the forward passes and losses under bfloat16 autocast; parameters, their gradients
    and the SGR term stay fp32. The output and δ passed to the next module are cast to `wire_dtype`
    (the compute dtype: bf16 under amp, unless the config asks for fp32, see stages.wire_dtype).
    `channels_last` keeps conv maps NHWC in memory.
    With `rng_seed`, dropout and stochastic depth draw from the module's own random stream, so a
    module gets the same draws whether it trains alone in a stage process or beside the others in
    one process (None: the global stream).
    A replica of a stage trains on one shard of each batch and averages its gradients with the
    other replicas' through `average_gradients` (given by the replica group, workers/replicas.py),
    between the backward and the optimizer step.
    """

    def __init__(
        self,
        module: nn.Module,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR | None = None,
        *,
        lam: float = 0.0,
        is_first: bool,
        is_last: bool,
        send_delta: bool,
        reforward: bool = False,
        sgr_reduction: str = "mean",
        track_sgr: bool = False,
        amp: bool = False,
        channels_last: bool = False,
        rng_seed: int | None = None,
        wire_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.module, self.head = module, head
        self.wire_dtype = wire_dtype
        self.rng_seed = rng_seed
        self.rng_state: dict[str, torch.Tensor] | None = None  # the module's stream between steps (checkpointed)
        self.amp, self.channels_last = amp, channels_last
        if channels_last:
            module.to(memory_format=torch.channels_last)
            head.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.lam, self.reduction = lam, sgr_reduction
        self.is_first, self.is_last = is_first, is_last
        self.send_delta, self.reforward = send_delta, reforward
        self.track_sgr = track_sgr and not is_first
        self.average_gradients: Callable[[list[nn.Parameter]], None] | None = None  # replicas: set by the stage

    needs_image = False  # whether train_step needs the batch's input images (InfoPro's reconstruction)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores of this module: weights, head, optimizer, schedule and its own random stream."""
        return {
            "module": self.module.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng_module": self.rng_state,  # dropout, stochastic depth; None before the first step
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (as `state_dict` made it, loaded on the CPU): each part places itself.

        The optimizer's buffers and the schedule's position come from `state`; its hyperparameters (learning rate,
        momentum, weight decay, ...) stay those this step was built with, so a resumed run's `--lr` takes effect
        (unchanged, the learning rate is recomputed to the bit: base × the schedule's factor at its step)."""
        self.module.load_state_dict(state["module"])
        self.head.load_state_dict(state["head"])
        configured = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, hyper in zip(self.optimizer.param_groups, configured):
            group.update(hyper)
        if self.scheduler is not None:
            base_lrs = self.scheduler.base_lrs
            self.scheduler.load_state_dict(state["scheduler"])
            self.scheduler.base_lrs = base_lrs
            for group, base, factor in zip(self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas):
                group["lr"] = base * factor(self.scheduler.last_epoch)  # as LambdaLR.step computes it
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # get_last_lr() agrees
        module_rng = state.get("rng_module")
        self.rng_state = None if module_rng is None else {name: t.cpu() for name, t in module_rng.items()}

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this step trains: the module's and its head's."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def apply_gradients(self) -> None:
        """The optimizer and schedule step, after averaging the gradients over the stage's replicas (if any).

        Each replica's loss is the mean over its equal shard, so the replicas' average gradient is the
        whole batch's. δ needs no such scaling: the SGR term normalises each sample's δ.
        """
        if self.average_gradients is not None:
            self.average_gradients(self.parameters())
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def needs_delta(self) -> bool:
        """Whether this module must receive the previous module's δ with its input."""
        return takes_delta(self.is_first, self.lam, self.track_sgr)

    def train_step(self, x: torch.Tensor, delta_prev: torch.Tensor | None, y: torch.Tensor,
                   image: torch.Tensor | None = None) -> StepOutput:
        """One update of this module on one batch (Algorithm 1, one k); `image`: the batch's uint8 input images,
        for local losses that reconstruct them (InfoPro)."""
        with self.own_rng(x.device):
            return self._update(x, delta_prev, y, image)

    def local_loss(self, out: torch.Tensor, y: torch.Tensor,
                   image: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the head's logits, or None for a head that does not classify; the module's local loss): cross entropy of
        its head."""
        logits = self.head(out)
        return logits, F.cross_entropy(logits, y)

    @contextlib.contextmanager
    def own_rng(self, device: torch.device) -> Iterator[None]:
        """Run the block on this module's random stream (seeded from rng_seed at first use), leaving the global one untouched."""
        if self.rng_seed is None:
            yield
            return
        cuda = device.type == "cuda"
        saved = self.rng_state or {}  # a stream saved on the CPU and continued on a GPU has no "cuda" part yet
        with torch.random.fork_rng(devices=[device] if cuda else []):
            if "cpu" in saved:
                torch.set_rng_state(saved["cpu"])
            else:
                torch.default_generator.manual_seed(self.rng_seed)
            if cuda and "cuda" in saved:
                torch.cuda.set_rng_state(saved["cuda"], device)
            elif cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(self.rng_seed)
            yield
            self.rng_state = {"cpu": torch.get_rng_state()}
            if cuda:
                self.rng_state["cuda"] = torch.cuda.get_rng_state(device)

    def _update(self, x: torch.Tensor, delta_prev: torch.Tensor | None, y: torch.Tensor,
                image: torch.Tensor | None) -> StepOutput:
        self.module.train()
        self.head.train()
        use_sgr = self.lam > 0 and not self.is_first
        if self.needs_delta and delta_prev is None:
            raise ValueError("this module uses SGR but received no δ from the previous module")
        x = self.prepare(x).requires_grad_(self.needs_delta)
        # SGR differentiates δ, a gradient, again: the fused attention kernels have no double backward
        math_attention = sdpa_kernel(SDPBackend.MATH) if use_sgr else contextlib.nullcontext()
        with self.autocast(x), math_attention:
            out = self.module(x)
            logits, loss_local = self.local_loss(out, y, image)
        loss = loss_local
        sgr = torch.zeros((), device=loss_local.device)
        if self.needs_delta:
            (delta_now,) = torch.autograd.grad(loss_local, x, create_graph=use_sgr, retain_graph=True)
            sgr = sgr_term(delta_now, delta_prev, self.reduction)
            if use_sgr:
                loss = loss_local + self.lam * sgr
        delta_out = None
        if self.send_delta and not self.is_last:
            (delta_out,) = torch.autograd.grad(loss_local, out, retain_graph=True)
            delta_out = delta_out.detach().to(self.wire_dtype)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.apply_gradients()
        passed_on = None
        if not self.is_last:
            if self.reforward:
                with torch.no_grad(), self.autocast(x):
                    passed_on = self.module(x.detach())
            else:
                passed_on = out.detach()
            passed_on = passed_on.to(self.wire_dtype)
        stats = StepStats(
            loss=loss_local.detach(),
            sgr=sgr.detach(),
            correct=(logits.detach().argmax(dim=1) == y).sum() if logits is not None
            else torch.zeros((), dtype=torch.long, device=loss_local.device),
            count=y.shape[0],
        )
        return StepOutput(out=passed_on, delta=delta_out, stats=stats)

    @torch.no_grad()
    def eval_output(self, x: torch.Tensor) -> torch.Tensor:
        """Inference through this module alone (module and head in eval mode), in its compute dtype."""
        self.module.eval()
        self.head.eval()
        with self.autocast(x):
            return self.module(self.prepare(x))

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference through this module and its head: (output, logits)."""
        out = self.eval_output(x)
        with self.autocast(x):
            logits = self.head(out)
        return out.to(self.wire_dtype), logits.float()

    def remember(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A k-NN bank batch before an evaluation: a module scored by k-NN keeps its features; one with a classifier
        only passes its output on."""
        return self.eval_output(x).to(self.wire_dtype)

    def forget(self) -> None:
        """The evaluation is over: drop what `remember` kept."""

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A received input, detached, in this module's memory format."""
        x = x.detach()
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self, x: torch.Tensor) -> torch.autocast:
        """bfloat16 autocast on x's device when amp is on; a no-op otherwise."""
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.amp)


class InfoProStep(StageStep):
    """A module of an InfoPro run (Wang et al. 2021): its local loss is λ1 · reconstruction of the input image by
    the decoder of its head (heads.InfoProHead) + λ2 · the cross entropy of its classifier; `weights` = (λ1, λ2)."""

    def __init__(self, *args: Any, weights: tuple[float, float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weights = weights

    needs_image = True

    def local_loss(self, out: torch.Tensor, y: torch.Tensor,
                   image: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if image is None:
            raise ValueError("an InfoPro module reconstructs its input image but received none")
        logits = self.head(out)
        decoded = self.head.decoder(out, image.shape[-2:]) if self.weights[0] else None  # λ1 = 0: no decoder pass
        return logits, infopro_loss(logits, y, decoded, image, self.weights)


class BarlowTwinsStep(StageStep):
    """A module trained self-supervised (Zbontar et al. 2021): its loss is Barlow Twins' between the projections
    (heads.ProjectorHead) of the batch's two views, rows [0, N) and [N, 2N); `off_diagonal_weight` is the paper's λ.
    It has no classifier: evaluation scores its pooled features by a k-NN vote over a bank of training images'.
    """

    def __init__(self, *args: Any, off_diagonal_weight: float, knn_k: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.off_diagonal_weight, self.knn_k = off_diagonal_weight, knn_k
        self.bank = FeatureBank()

    def local_loss(self, out: torch.Tensor, y: torch.Tensor,
                   image: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        first_view, second_view = self.head(out).chunk(2)
        return None, barlow_twins_loss(first_view, second_view, self.off_diagonal_weight)

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, k-NN class scores of its pooled features against the bank)."""
        out = self.eval_output(x)
        return out.to(self.wire_dtype), self.bank.scores(self.head.pool(out.float()), self.knn_k)

    def remember(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.eval_output(x)
        self.bank.add(self.head.pool(out.float()), y)
        return out.to(self.wire_dtype)

    def forget(self) -> None:
        self.bank.clear()


class SignalStep(StageStep):
    """One layer of a BP-free baseline (fa, dfa, drtp, pepita): it learns from a signal given at its output.

    The layer's parameters get ∂<out, signal>/∂θ, its own backward only (pepita: ∂<pre, signal>/∂θ at the
    pre-activation, skipping the ReLU's derivative); its fixed ETF head just reports its loss and accuracy. Its fixed
    random feedback matrices (pipeline/bpfree.py) are drawn from `seed` when first needed, so every process that builds
    it gets the same.
    """

    def __init__(
        self,
        module: nn.Module,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR | None = None,
        *,
        method: str,
        num_classes: int,
        seed: int,
        is_first: bool,
        is_last: bool,
    ) -> None:
        super().__init__(module, head, optimizer, scheduler, is_first=is_first, is_last=is_last, send_delta=False)
        self.method, self.num_classes, self.seed = method, num_classes, seed
        self.feedback: torch.Tensor | None = None
        self.pre: torch.Tensor | None = None  # FA: fc's output of the last forward; PEPITA: the input to its ReLU

    def feedback_matrix(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """This layer's fixed random matrix (C×D for dfa/drtp, its weight's shape for fa), drawn once."""
        if self.feedback is None:
            self.feedback = random_feedback(rows, cols, self.seed).to(device)
        return self.feedback

    def weight_feedback(self) -> torch.Tensor:
        """FA: the fixed matrix that stands in for this layer's weight in the backward pass."""
        weight = self.module[0].fc.weight
        return self.feedback_matrix(*weight.shape, weight.device)

    def input_feedback(self, x: torch.Tensor) -> torch.Tensor:
        """PEPITA (first layer): the fixed C×D_in matrix F that projects the output error onto the input."""
        if self.feedback is None:
            self.feedback = pepita_feedback(self.num_classes, x[0].numel(), self.seed).to(x.device)
        return self.feedback

    def output_feedback(self, out: torch.Tensor) -> torch.Tensor:
        """DFA, DRTP: the fixed C×D matrix that projects an N×C error or target to this layer's output."""
        return self.feedback_matrix(self.num_classes, out[0].numel(), out.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's output on a detached input, with its graph kept for `apply` (FA keeps the pre-activation)."""
        self.module.train()
        self.head.train()
        x = self.prepare(x)
        with self.autocast(x):
            layer = self.module[0]
            if self.method == "fa":
                self.pre = layer.fc(x.flatten(1))
                return layer.activate(self.pre)
            if self.method == "pepita":
                self.pre = before_relu(layer, x)
                return self.pre.relu()
            return self.module(x)

    def fa_down(self, out: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """FA: the signal for the layer below, from this layer's signal (call before `apply` frees the graph)."""
        (pre_signal,) = torch.autograd.grad(out, self.pre, signal, retain_graph=True)
        return fa_signal(pre_signal, self.weight_feedback())

    def output_signal(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer: (∂CE/∂out through its fixed head, the output error e = ∂CE/∂logits)."""
        logits = self.head(out).float()
        (signal,) = torch.autograd.grad(F.cross_entropy(logits, y), out)
        return signal, output_error(logits.detach(), y)

    def apply(self, out: torch.Tensor, signal: torch.Tensor, y: torch.Tensor,
              at: torch.Tensor | None = None) -> StepOutput:
        """Update this layer's parameters by ∂<out, signal>/∂θ (or ∂<at, signal>/∂θ: PEPITA's pre-activation of its
        modulated pass) and report its head's loss on out."""
        with torch.no_grad():
            logits = self.head(out).float()
            loss_cls = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        target = out if at is None else at
        target.backward(signal.to(target.dtype))
        self.apply_gradients()
        stats = StepStats(loss=loss_cls, sgr=torch.zeros((), device=out.device),
                          correct=(logits.argmax(dim=1) == y).sum(), count=y.shape[0])
        return StepOutput(out=None if self.is_last else out.detach().to(self.wire_dtype), delta=None, stats=stats)

    def train_step(self, x: torch.Tensor, delta_prev: torch.Tensor | None, y: torch.Tensor,
                   image: torch.Tensor | None = None) -> StepOutput:
        """DRTP: the update needs only this layer's input and the label, so it runs in a pipeline stage."""
        if self.method != "drtp":
            raise ValueError(f"method {self.method} needs the output error of the whole network: use trainer.feedback_batch")
        out = self.forward(x)
        return self.apply(out, drtp_signal(y, self.output_feedback(out), out.shape), y)
