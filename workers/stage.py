"""A stage process: receive (activation, δ, labels), take the local step, send its own on.

Stage 1 owns the data: it draws the same batches as the reference trainer and, when an
evaluation or checkpoint is due after batch t, sends the test set (then the ΔL_k probe batch
on the `eval_end` marker) or a `checkpoint` marker behind batch t. Each link is FIFO and each
stage handles messages in arrival order, so every stage evaluates or saves with exactly the
weights it has after batch t, stage k trains on batch t while stage k-1 trains on batch t+1,
and the numbers equal the sequential reference's.
"""
from __future__ import annotations

import os
import resource
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zmq

from pipeline.checkpoint import check_finite, checkpoint_dir, fingerprint, load_stage_state, save_atomic, stage_state
from pipeline.config import Config, from_dict
from pipeline.data import DataShape, data_shape, eval_batches, load_config_data, probe_batch, to_device
from pipeline.lifeline import adopt_environment, exit_with
from pipeline.metrics import ModuleMeter, topk_correct, train_records
from pipeline.probe import InputDriftProbe
from pipeline.schedule import run_epochs
from pipeline.stages import build_local_modules, build_stage_step, configure_torch, cuts_of
from pipeline.step import StageStep
from workers.simulated import SimulatedStep
from workers.messages import Kind, Record
from workers.placement import LinkKind
from workers.security import RunKeys
from workers.trace import Tracer, now
from workers.transport import LINGER_MS, Message, Receiver, Reporter, Sender, remove_segments


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
    shape: DataShape  # the data's sizes: later stages do not load the data
    out_link: LinkKind = LinkKind.ZMQ  # how tensors travel to the next stage (placement.link_kind)
    resume: str | None = None  # checkpoint folder to continue from
    start_step: int = 0  # the training step that checkpoint holds
    keys: RunKeys | None = None  # tcp links: the run's CURVE keys (workers/security.py)
    launcher_pid: int | None = None  # the process that started this one: the stage ends when it does
    environment: dict[str, str] | None = None  # the launcher's, when it started the run (the forkserver's is older)


class Heartbeat(threading.Thread):
    """Tells the coordinator once a second that this process is alive, from its own thread and socket.

    Independent of the training loop: a long step, a slow data decode or a wait on a neighbour
    does not silence it; a frozen or killed process does, so the coordinator names the right stage.
    """

    PERIOD_S = 1.0

    def __init__(self, ctx: zmq.Context, endpoint: str, rank: int, keys: RunKeys | None = None) -> None:
        super().__init__(name=f"heartbeat{rank + 1}", daemon=True)
        self.ctx, self.endpoint, self.rank, self.keys = ctx, endpoint, rank, keys
        self.stopped = threading.Event()

    def run(self) -> None:
        reporter = Reporter(self.ctx, self.endpoint, self.rank, self.keys)  # zmq sockets belong to one thread each
        try:
            while not self.stopped.wait(self.PERIOD_S):
                reporter.send({"kind": Record.BEAT})
        finally:
            reporter.close()

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=5)


class StageWorker:
    """One module's training loop inside its own process."""

    def __init__(self, spec: StageSpec, ctx: zmq.Context) -> None:
        """Build this stage's module and bind its input link; `connect` then joins the next stage."""
        self.spec, self.ctx = spec, ctx
        self.cfg: Config = from_dict(spec.config)
        self.rank, self.last = spec.rank, spec.rank == spec.stages - 1
        self.device = torch.device(spec.device)
        configure_torch(self.cfg)  # before the first CUDA call: deterministic kernels need the cuBLAS workspace set
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.set_num_threads(spec.threads)
        self.data = load_config_data(self.cfg) if self.rank == 0 else None  # stage 1 alone draws batches
        shape = spec.shape
        if self.data is not None and data_shape(self.data, self.cfg.batch_size) != shape:
            raise ValueError(f"the data changed since the launcher read it: {data_shape(self.data, self.cfg.batch_size)}"
                             f" here, {shape} there; start the run again")
        local = build_local_modules(self.cfg, shape.in_channels, shape.num_classes, shape.input_size)
        if len(local) != spec.stages:
            raise ValueError(f"the config's split gives {len(local)} modules but the pipeline has {spec.stages} stages")
        self.local = local[self.rank]
        self.local.module.to(self.device)
        self.local.head.to(self.device)
        self.steps_per_epoch = shape.steps_per_epoch
        self.fingerprint = fingerprint(self.cfg, cuts_of(local))
        # its own optimizer and schedule only; the other modules (built for their seeded weights) are dropped here
        self.real_step: StageStep = build_stage_step(self.cfg, self.local, self.rank, spec.stages, self.steps_per_epoch)
        self.probe = InputDriftProbe()
        if spec.resume is not None:
            path = Path(spec.resume) / f"stage{self.rank + 1}.pt"
            self.probe.previous_input = load_stage_state(self.real_step, path, self.device)
        self.step: StageStep | SimulatedStep = self.real_step
        if self.cfg.simulate_step_ms > 0:  # bench/schedule_overhead.py: sleep instead of compute
            self.step = SimulatedStep(self.real_step, self.cfg.simulate_step_ms)
        self.probing = self.cfg.probe_size > 0 and self.cfg.simulate_step_ms == 0
        self.receiver = None if spec.in_endpoint is None else Receiver(
            ctx, spec.in_endpoint, self.cfg.peer_timeout, self.device, peer=f"stage {self.rank}", keys=spec.keys)
        self.heartbeat: Heartbeat | None = None
        self.sender: Sender | None = None
        self.reporter: Reporter | None = None
        self.meter = ModuleMeter(1, first_module=self.rank)
        self.busy = self.idle = 0.0
        self.trace = Tracer(self.cfg.trace)
        self.eval_counts: list[torch.Tensor | int] = [0, 0, 0]  # correct top-1, top-5 (on the device), samples

    @property
    def in_endpoint(self) -> str | None:
        """The bound input address (with the real port when bound to tcp port '*')."""
        return None if self.receiver is None else self.receiver.endpoint

    def connect(self, out_endpoint: str | None, report_endpoint: str, out_link: LinkKind = LinkKind.ZMQ) -> None:
        """Connect to the next stage's input link and to the coordinator."""
        if out_endpoint is not None:
            self.sender = Sender(self.ctx, out_endpoint, out_link, self.cfg.depth, self.cfg.peer_timeout,
                                 peer=f"stage {self.rank + 2}", keys=self.spec.keys)
        self.reporter = Reporter(self.ctx, report_endpoint, self.rank, self.spec.keys)
        self.heartbeat = Heartbeat(self.ctx, report_endpoint, self.rank, self.spec.keys)

    # --- the loop -----------------------------------------------------------------

    def run(self) -> None:
        self.reporter.send({"kind": Record.READY, "pid": os.getpid(), "fingerprint": self.fingerprint})
        self.heartbeat.start()
        if self.receiver is None:
            self._feed()
        else:
            self._relay()
        if self.sender is not None:
            self.sender.drain()
        self.reporter.send({"kind": Record.DONE, "busy": self.busy, "idle": self.idle, "peak_memory": self.peak_memory(),
                            "link": self.sender.kind.value if self.sender is not None else None,
                            "trace": self.trace.spans if self.trace.enabled else None})

    def peak_memory(self) -> int:
        """This stage's peak memory in bytes: allocated on its GPU, or the process's resident set on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def _feed(self) -> None:
        """Stage 1: draw the batches, train, and send results on; evaluation and checkpoint markers when due."""
        probe = probe_batch(self.data, self.cfg.probe_size, self.device) if self.probing else None
        for _, _, steps in run_epochs(self.cfg, self.data, self.steps_per_epoch, self.spec.start_step, self.device):
            for s in steps:  # images uint8 to the device, normalised there; labels on the host
                header = {"epoch": s.epoch, "step": s.step}
                self._train({"kind": Kind.TRAIN, **header}, {"x": s.x, "y": s.y})
                if s.evaluate:
                    for ex, ey in eval_batches(self.data, self.cfg.eval_batch_size, self.device):
                        self._eval({"kind": Kind.EVAL, **header}, {"x": ex, "y": ey})
                    self._eval_end({"kind": Kind.EVAL_END, **header}, {} if probe is None else dict(zip("xy", probe)))
                if s.checkpoint:
                    self._checkpoint({"kind": Kind.CHECKPOINT, **header}, {})
        self._stop({"kind": Kind.STOP}, {})

    def _relay(self) -> None:
        """Stages 2..K: handle messages in arrival order until `stop`."""
        handlers = {Kind.TRAIN: self._train, Kind.EVAL: self._eval, Kind.EVAL_END: self._eval_end,
                    Kind.CHECKPOINT: self._checkpoint, Kind.STOP: self._stop}
        while True:
            start = now()
            message: Message = self.receiver.recv()
            end = now()
            self.idle += end - start
            self.trace.add("input", start, end, message.header.get("step"))
            kind = Kind(message.header["kind"])
            handlers[kind](message.header, message.tensors)
            self.receiver.done(message)  # the message's tensors are the producer's again
            if kind is Kind.STOP:
                return

    # --- message handlers: (header, tensors by name), the same in stage 1 and in stages 2..K ----------

    # Labels `y` arrive and leave on the host (placement.HOST_TENSORS); each handler moves its own copy to the device.

    def _train(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        x, y = tensors["x"], tensors["y"]
        start = now()
        result = self.step.train_step(x, tensors.get("delta"), to_device(y, self.device))
        self.meter.update(0, result.stats)
        end = now()
        self.busy += end - start
        self.trace.add("train", start, end, header["step"])
        self._send({"kind": Kind.TRAIN, "epoch": header["epoch"], "step": header["step"]},
                   {"x": result.out, "delta": result.delta, "y": y})
        if header["step"] % self.cfg.log_every == 0 or header["step"] % self.steps_per_epoch == 0:
            lr = self.step.optimizer.param_groups[0]["lr"]
            for record in train_records(self.meter, header["epoch"], header["step"], [lr]):
                queue = len(self.sender.in_flight) if self.sender is not None else 0  # sent, not yet done downstream
                self.reporter.send({"kind": Record.TRAIN, "record": record, "busy": self.busy, "idle": self.idle,
                                    "queue": queue})
            self.meter.reset()

    def _eval(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        x, y = tensors["x"], tensors["y"]
        start = now()
        out, logits = self.step.eval_forward(x)
        correct1, correct5 = topk_correct(logits, to_device(y, self.device))
        self.eval_counts[0] += correct1
        self.eval_counts[1] += correct5
        self.eval_counts[2] += y.shape[0]
        self.trace.add("eval", start, now(), header["step"])
        self._send(header, {"x": out, "y": y})

    def _eval_end(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Report this head's accuracy and ΔL_k (on the probe batch that rides on the marker), then pass it on."""
        start = now()
        correct1, correct5, count = (int(c) for c in self.eval_counts)
        delta_loss, probe = None, {}
        if "x" in tensors:
            out, delta_loss = self.probe(self.real_step, tensors["x"], to_device(tensors["y"], self.device))
            probe = {"x": out, "y": tensors["y"]}
        self.trace.add("eval", start, now(), header["step"])
        self.reporter.send({"kind": Record.EVAL, "epoch": header["epoch"], "step": header["step"],
                            "acc": correct1 / max(1, count), "top5": correct5 / max(1, count), "delta_loss": delta_loss})
        self.eval_counts = [0, 0, 0]
        self._send(header, probe)

    def _checkpoint(self, header: dict[str, Any], _tensors: dict[str, torch.Tensor]) -> None:
        """Save this module's state after the training batch the marker follows, then pass the marker on."""
        start = now()
        self.meter.check_finite()  # a NaN since the last log must not reach a sealed checkpoint
        check_finite(self.real_step, self.rank + 1)  # nor an inf in a weight or BatchNorm statistic
        path = checkpoint_dir(Path(self.cfg.out), header["step"]) / f"stage{self.rank + 1}.pt"
        save_atomic(stage_state(self.real_step, self.device, self.probe.previous_input), path)
        self.trace.add("checkpoint", start, now(), header["step"])
        self.reporter.send({"kind": Record.SAVED, "epoch": header["epoch"], "step": header["step"]})
        self._send(header, {})

    def _stop(self, header: dict[str, Any], _tensors: dict[str, torch.Tensor]) -> None:
        """Training is over: pass `stop` on (the loop then drains the link and reports done)."""
        self._send(header, {})

    def _send(self, header: dict[str, Any], tensors: dict[str, torch.Tensor | None]) -> None:
        """Pass a message on; evaluation and probe batches use the link's evaluation window, so they never
        hold back the training batch that follows them (no evaluation bubble at the default depth)."""
        if self.sender is None:
            return
        start = now()
        waited = self.sender.send(header, tensors, training=Kind(header["kind"]).training)
        end = now()
        self.idle += end - start
        if waited:
            self.trace.add("credit", start, start + waited, header.get("step"))
        self.trace.add("send", start + waited, end, header.get("step"))

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        for part in (self.receiver, self.sender, self.reporter):
            if part is not None:
                part.close()


def _end_on_sigterm(signum: int, _frame: Any) -> None:
    """SIGTERM (the launcher stopping the run, or `exit_with`): unlink this process's shared memory, then die of it."""
    remove_segments(os.getpid())
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def stage_main(spec: StageSpec) -> None:
    """Entry point of a stage process: run the worker; report any error to the coordinator, then re-raise."""
    signal.signal(signal.SIGTERM, _end_on_sigterm)
    if spec.environment is not None:  # before any CUDA call: CUDA_VISIBLE_DEVICES as the launcher sees it now
        adopt_environment(spec.environment)
    if spec.launcher_pid is not None:
        exit_with(spec.launcher_pid)  # a launcher killed with SIGKILL cannot stop its stages itself
    ctx = zmq.Context()
    worker = None
    try:
        worker = StageWorker(spec, ctx)
        worker.connect(spec.out_endpoint, spec.report_endpoint, spec.out_link)
        worker.run()
    except KeyboardInterrupt:
        pass
    except BaseException as err:
        if worker is not None and worker.reporter is not None:
            worker.reporter.send({"kind": Record.ERROR, "error": f"{type(err).__name__}: {err}"})
        else:  # failed before connecting: a short-lived reporter, closed so that ctx.term() cannot block
            reporter = Reporter(ctx, spec.report_endpoint, spec.rank, spec.keys)
            reporter.send({"kind": Record.ERROR, "error": f"{type(err).__name__}: {err}"})
            reporter.close()
        raise
    finally:
        if worker is not None:
            worker.close()
        ctx.destroy(linger=LINGER_MS)  # pending records get LINGER_MS to leave; never blocks longer
