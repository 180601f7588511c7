"""A stage process: receive (activation, δ, labels), take the local step, send its own on.

Stage 1 owns the data: it draws the same batches as the reference trainer, and after each
epoch sends the test set behind its last training batch, so every stage evaluates with
exactly the weights it has at that point. Each link is FIFO and each stage handles messages
in arrival order, so stage k trains on batch t while stage k-1 trains on batch t+1, and the
numbers equal the sequential reference's.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq

from pipeline.config import Config, from_dict
from pipeline.data import eval_batches, load_data, steps_per_epoch, train_batches
from pipeline.metrics import ModuleMeter, train_records
from pipeline.stages import build_local_modules, build_stage_steps
from pipeline.step import StageStep
from workers.simulated import SimulatedStep
from workers.transport import LINGER_MS, Message, Receiver, Sender


@dataclass
class StageSpec:
    """Everything a stage process needs to start: its place in the pipeline and where its peers are."""

    rank: int  # 0-based stage index
    stages: int
    config: dict[str, Any]
    in_endpoint: str | None  # where this stage binds its input link (None for stage 1); tcp port may be '*'
    out_endpoint: str | None  # the next stage's input link (None for the last stage; filled by `connect`)
    report_endpoint: str | None  # where the coordinator collects records (filled by `connect` if None)
    device: str
    threads: int
    cuda_ipc: bool = False  # send to the next stage by CUDA IPC handle


class Reporter:
    """Pushes msgpack records from a stage to the coordinator."""

    def __init__(self, ctx: zmq.Context, endpoint: str, rank: int) -> None:
        self.socket = ctx.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.socket.connect(endpoint)
        self.rank = rank

    def send(self, record: dict[str, Any]) -> None:
        self.socket.send(msgpack.packb({"stage": self.rank, **record}, use_bin_type=True))

    def close(self) -> None:
        self.socket.close()


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a reader never sees a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StageWorker:
    """One module's training loop inside its own process."""

    def __init__(self, spec: StageSpec, ctx: zmq.Context) -> None:
        """Build this stage's module and bind its input link; `connect` then joins the next stage."""
        self.spec, self.ctx = spec, ctx
        self.cfg: Config = from_dict(spec.config)
        self.rank, self.last = spec.rank, spec.rank == spec.stages - 1
        self.device = torch.device(spec.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.set_num_threads(spec.threads)
        self.data = load_data(self.cfg.dataset, self.cfg.data_dir, self.cfg.image_size, self.cfg.train_subset)
        local = build_local_modules(self.cfg, self.data.in_channels, self.data.num_classes, self.data.input_size)
        if len(local) != spec.stages:
            raise ValueError(f"the config's split gives {len(local)} modules but the pipeline has {spec.stages} stages")
        self.local = local[self.rank]
        self.local.module.to(self.device)
        self.local.head.to(self.device)
        self.steps_per_epoch = steps_per_epoch(self.data, self.cfg.batch_size)
        self.step: StageStep = build_stage_steps(self.cfg, local, self.steps_per_epoch)[self.rank]
        if self.cfg.simulate_step_ms > 0:  # bench/schedule_overhead.py: sleep instead of compute
            self.step = SimulatedStep(self.step, self.cfg.simulate_step_ms)
        self.receiver = None if spec.in_endpoint is None else Receiver(
            ctx, spec.in_endpoint, self.cfg.peer_timeout, self.device, peer=f"stage {self.rank}")
        self.sender: Sender | None = None
        self.reporter: Reporter | None = None
        self.meter = ModuleMeter(1)
        self.busy = self.idle = 0.0
        self.eval_counts = [0, 0, 0]  # correct top-1, correct top-5, samples

    @property
    def in_endpoint(self) -> str | None:
        """The bound input address (with the real port when bound to tcp port '*')."""
        return None if self.receiver is None else self.receiver.endpoint

    def connect(self, out_endpoint: str | None, report_endpoint: str, cuda_ipc: bool = False) -> None:
        """Connect to the next stage's input link and to the coordinator."""
        if out_endpoint is not None:
            self.sender = Sender(self.ctx, out_endpoint, self.cfg.depth, self.cfg.peer_timeout, cuda_ipc,
                                 peer=f"stage {self.rank + 2}")
        self.reporter = Reporter(self.ctx, report_endpoint, self.rank)

    # --- the loop -----------------------------------------------------------------

    def run(self) -> None:
        self.reporter.send({"kind": "ready", "pid": os.getpid()})
        if self.receiver is None:
            self._feed()
        else:
            self._relay()
        if self.sender is not None:
            self.sender.drain()
        save_atomic({"module": self.local.module.state_dict(), "head": self.local.head.state_dict()},
                    Path(self.cfg.out) / "stages" / f"stage{self.rank + 1}.pt")
        self.reporter.send({"kind": "done", "busy": self.busy, "idle": self.idle})

    def _feed(self) -> None:
        """Stage 1: draw the batches, train, and send results on; the test set after each epoch."""
        for epoch in range(self.cfg.epochs):
            batches = train_batches(self.data, epoch, self.cfg.batch_size, self.cfg.seed, self.cfg.augment)
            for i, (x, y) in enumerate(batches):
                step = epoch * self.steps_per_epoch + i + 1
                self._train({"kind": "train", "epoch": epoch, "step": step}, x.to(self.device), None, y.to(self.device))
            for x, y in eval_batches(self.data, self.cfg.eval_batch_size):
                self._eval({"kind": "eval", "epoch": epoch, "step": step}, x.to(self.device), y.to(self.device))
            self._eval_end({"kind": "eval_end", "epoch": epoch, "step": step})
        self._send({"kind": "stop"}, {})

    def _relay(self) -> None:
        """Stages 2..K: handle messages in arrival order until `stop`."""
        while True:
            start = time.perf_counter()
            message: Message = self.receiver.recv()
            self.idle += time.perf_counter() - start
            header, tensors = message.header, message.tensors
            kind = header["kind"]
            if kind == "train":
                self._train(header, tensors["x"], tensors.get("delta"), tensors["y"])
            elif kind == "eval":
                self._eval(header, tensors["x"], tensors["y"])
            elif kind == "eval_end":
                self._eval_end(header)
            self.receiver.done(message)
            if kind == "stop":
                self._send(header, {})
                return

    # --- message handlers -----------------------------------------------------------

    def _train(self, header: dict[str, Any], x: torch.Tensor, delta: torch.Tensor | None, y: torch.Tensor) -> None:
        start = time.perf_counter()
        result = self.step.train_step(x, delta, y)
        self.meter.update(0, result.stats)
        self.busy += time.perf_counter() - start
        self._send({"kind": "train", "epoch": header["epoch"], "step": header["step"]},
                   {"x": result.out, "delta": result.delta, "y": y})
        if header["step"] % self.cfg.log_every == 0 or header["step"] % self.steps_per_epoch == 0:
            lr = self.step.optimizer.param_groups[0]["lr"]
            for record in train_records(self.meter, header["epoch"], header["step"], [lr], first_module=self.rank):
                self.reporter.send({"kind": "train", "record": record, "busy": self.busy, "idle": self.idle})
            self.meter.reset()

    def _eval(self, header: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> None:
        out, logits = self.step.eval_forward(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.eval_counts[0] += int((top[:, 0] == y).sum())
        self.eval_counts[1] += int((top == y[:, None]).any(dim=1).sum())
        self.eval_counts[2] += y.shape[0]
        self._send(header, {"x": out, "y": y})

    def _eval_end(self, header: dict[str, Any]) -> None:
        correct1, correct5, count = self.eval_counts
        self.reporter.send({"kind": "eval", "epoch": header["epoch"], "step": header["step"],
                            "acc": correct1 / max(1, count), "top5": correct5 / max(1, count)})
        self.eval_counts = [0, 0, 0]
        self._send(header, {})

    def _send(self, header: dict[str, Any], tensors: dict[str, torch.Tensor | None]) -> None:
        if self.sender is None:
            return
        start = time.perf_counter()
        self.sender.send(header, tensors)
        self.idle += time.perf_counter() - start

    def close(self) -> None:
        for part in (self.receiver, self.sender, self.reporter):
            if part is not None:
                part.close()


def stage_main(spec: StageSpec) -> None:
    """Entry point of a stage process: run the worker; report any error to the coordinator, then re-raise."""
    _die_with_parent()
    ctx = zmq.Context()
    worker = None
    try:
        worker = StageWorker(spec, ctx)
        worker.connect(spec.out_endpoint, spec.report_endpoint, spec.cuda_ipc)
        worker.run()
    except KeyboardInterrupt:
        pass
    except BaseException as err:
        if worker is not None and worker.reporter is not None:
            worker.reporter.send({"kind": "error", "error": f"{type(err).__name__}: {err}"})
        else:  # failed before connecting: a short-lived reporter, closed so that ctx.term() cannot block
            reporter = Reporter(ctx, spec.report_endpoint, spec.rank)
            reporter.send({"kind": "error", "error": f"{type(err).__name__}: {err}"})
            reporter.close()
        raise
    finally:
        if worker is not None:
            worker.close()
        ctx.term()


def _die_with_parent() -> None:
    """On Linux, have the kernel send SIGTERM to this process when its parent dies (no orphans)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
