"""A stage process: receive (activation, δ, labels), take the local step, send its own on.

Stage 1 owns the data: it draws the same batches as the reference trainer and, when an
evaluation or checkpoint is due after batch t, sends the test set (then the ΔL_k probe batch
on the `eval_end` marker) or a `checkpoint` marker behind batch t. Each link is FIFO and each
stage handles messages in arrival order, so every stage evaluates or saves with exactly the
weights it has after batch t, stage k trains on batch t while stage k-1 trains on batch t+1,
and the numbers equal the sequential reference's.

A stage may run as several replicas (`replicas`), each on an equal shard of every batch
(workers/routes.py): a replica receives its rows from the replicas of the previous stage that
hold them (one message from each, merged in row order) and sends each replica of the next stage
the rows it needs. The replicas of a stage average their gradients and sum their metrics through
their process group (workers/replicas.py); replica 0 reports, evaluates the ΔL_k probe and saves.
"""
from __future__ import annotations

import functools
import os
import resource
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import zmq

from pipeline.checkpoint import (CheckpointError, DiskFull, RunFileError, check_finite, checkpoint_dir, fingerprint,
                                 load_stage_state, save_atomic, stage_state)
from pipeline.config import Config, from_dict, knn_bank_size, per_stage
from pipeline.data import (Data, DataError, DataShape, bank_batches, data_shape, eval_batches, load_config_data,
                           probe_batch, rows_of, to_device)
from pipeline.lifeline import adopt_environment, exit_with, restore_interrupts
from pipeline.metrics import ModuleMeter, topk_correct, train_records
from pipeline.probe import InputDriftProbe
from pipeline.schedule import run_epochs
from pipeline.stages import build_local_modules, build_stage_step, configure_torch, cuts_of, module_flow
from pipeline.step import StageStep
from pipeline.syncbn import convert_sync_bn
from workers.simulated import SimulatedStep
from workers.messages import Kind, Record
from workers.outbox import Outbox
from workers.placement import LinkKind, host_id, sends_in_background
from workers.replicas import ReplicaGroup, ReplicasDiverged, collective, group_backend, join_group
from workers.routes import Worker, receivers_of, rows_to, senders_of, shard
from workers.security import RunKeys
from workers.trace import Tracer, now
from workers.transport import LINGER_MS, Message, PeerLost, Receiver, Reporter, Sender, remove_segments


REPLICA_STREAMS = 2**20  # replica r > 0 of a module draws dropout masks from the module's seed + r * this


@dataclass
class StageSpec:
    """Everything a stage process needs to start: its place in the pipeline and where its peers are."""

    rank: int  # 0-based stage index
    stages: int
    config: dict[str, Any]
    in_endpoints: list[str]  # where this process binds one input link per sender (routes.senders_of; none for stage 1); tcp port may be '*'
    out_endpoints: list[str]  # the input links of the next stage's replicas it sends to (routes.receivers_of; filled by `connect`)
    report_endpoint: str | None  # where the coordinator collects records (filled by `connect` if None)
    device: str
    threads: int
    shape: DataShape  # the data's sizes: later stages do not load the data
    out_links: list[LinkKind] = field(default_factory=list)  # how tensors travel on each out link (placement.link_kind)
    resume: str | None = None  # checkpoint folder to continue from
    start_step: int = 0  # the training step that checkpoint holds
    keys: RunKeys | None = None  # tcp links: the run's CURVE keys (workers/security.py)
    launcher_pid: int | None = None  # the process that started this one: the stage ends when it does
    environment: dict[str, str] | None = None  # the launcher's, when it started the run (the forkserver's is older)
    replica: int = 0  # which replica of its stage this process is
    counts: list[int] | None = None  # replicas of every stage (None: one each)
    group_devices: list[str] | None = None  # the devices of this stage's replicas (they pick the collective backend)
    group_store: str | None = None  # spawned runs: the file where this stage's replicas meet (None under torchrun)

    @property
    def replicas(self) -> list[int]:
        """How many replicas each stage has."""
        return self.counts or [1] * self.stages

    @property
    def worker(self) -> int:
        """This process's index among all of the run's (routes.workers order): how the coordinator tells them apart."""
        return sum(self.replicas[:self.rank]) + self.replica

    @property
    def name(self) -> str:
        return Worker(self.rank, self.replica).name(self.replicas)


class Heartbeat(threading.Thread):
    """Tells the coordinator once a second that this process is alive, from its own thread and socket.

    Independent of the training loop: a long step, a slow data decode or a wait on a neighbour
    does not silence it; a frozen or killed process does, so the coordinator names the right stage.
    """

    PERIOD_S = 1.0

    def __init__(self, ctx: zmq.Context, endpoint: str, rank: int, keys: RunKeys | None = None, worker: int | None = None) -> None:
        super().__init__(name=f"heartbeat{rank + 1}", daemon=True)
        self.ctx, self.endpoint, self.rank, self.keys, self.worker = ctx, endpoint, rank, keys, worker
        self.stopped = threading.Event()
        self.step: int | None = None  # the last step this process trained (set by its loop), sent with each beat

    def run(self) -> None:
        reporter = Reporter(self.ctx, self.endpoint, self.rank, self.keys, self.worker)  # zmq sockets belong to one thread each
        try:
            while not self.stopped.wait(self.PERIOD_S):
                reporter.send({"kind": Record.BEAT, "step": self.step})
        finally:
            reporter.close()

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=5)


class StageWorker:
    """One module's training loop inside its own process."""

    def __init__(self, spec: StageSpec, ctx: zmq.Context, group: ReplicaGroup | None = None,
                 data: Data | None = None) -> None:
        """Build this stage's module, meet its replicas (`group` under torchrun) and bind its input links;
        `connect` then joins the next stage. `data`: stage 1's, where this process has loaded it already (a torchrun
        rank: launch.py did), so that it is not loaded (or an ImageFolder listed) twice."""
        self.spec, self.ctx = spec, ctx
        self.cfg: Config = from_dict(spec.config)
        self.rank, self.last = spec.rank, spec.rank == spec.stages - 1
        self.counts, self.replica = spec.replicas, spec.replica
        self.lead = spec.replica == 0  # replica 0 reports, probes ΔL_k and saves the stage's checkpoint
        self.device = torch.device(spec.device)
        configure_torch(self.cfg, self.device)  # before the first CUDA call (deterministic kernels: cuBLAS workspace)
        torch.set_num_threads(spec.threads)
        if self.rank == 0:  # stage 1 alone draws batches
            self.data = data if data is not None else load_config_data(self.cfg)
        else:
            self.data = None
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
        self.flow = module_flow(self.cfg, self.rank, spec.stages)  # what it passes on besides its output
        self.probe = InputDriftProbe()
        if spec.resume is not None:
            path = Path(spec.resume) / f"stage{self.rank + 1}.pt"
            self.probe.previous_input = load_stage_state(self.real_step, path, self.device)
        simulate_ms = per_stage(self.cfg.simulate_step_ms, spec.stages, "simulate_step_ms")[self.rank]
        self.step: StageStep | SimulatedStep = self.real_step
        if simulate_ms > 0:  # bench/schedule_overhead.py, bench/replicas.py: sleep instead of compute
            self.step = SimulatedStep(self.real_step, simulate_ms / self.counts[self.rank])
        self.probing = self.cfg.probe_size > 0 and simulate_ms == 0 and self.lead
        # one input link per replica of the previous stage that holds some of this replica's rows, in row order
        self.sources = [] if self.rank == 0 else senders_of(self.replica, self.counts[self.rank], self.counts[self.rank - 1])
        if len(spec.in_endpoints) != len(self.sources):
            raise ValueError(f"{spec.name} receives from {len(self.sources)} replicas but was given "
                             f"{len(spec.in_endpoints)} input links")
        self.receivers = [Receiver(ctx, endpoint, self.cfg.peer_timeout, self.device, keys=spec.keys,
                                   peer=Worker(self.rank - 1, source).name(self.counts))
                          for endpoint, source in zip(spec.in_endpoints, self.sources)]
        self.targets = [] if self.last else receivers_of(self.replica, self.counts[self.rank], self.counts[self.rank + 1])
        self.heartbeat: Heartbeat | None = None
        self.senders: list[Sender] = []
        self.outbox: Outbox | None = None
        self.reporter: Reporter | None = None
        self.meter = ModuleMeter(1, first_module=self.rank)
        self.busy = self.idle = 0.0
        self.trace = Tracer(self.cfg.trace and self.lead)  # one row per stage in the trace: replica 0's
        self.eval_counts: list[torch.Tensor | int] = [0, 0, 0]  # correct top-1, top-5 (on the device), samples
        self.group = self._join_replicas(group)  # last: nothing after it can fail and leave a group no one ends

    def _join_replicas(self, group: ReplicaGroup | None) -> ReplicaGroup | None:
        """Meet this stage's other replicas (given `group` under torchrun, a file store when spawned) and make the
        step average its gradients with theirs; BatchNorm shares statistics over the stage batch with `sync_bn`."""
        spec = self.spec
        self.own_group = group is None and self.counts[self.rank] > 1  # spawned: this process made it, and ends it
        if self.own_group:
            devices = spec.group_devices or [spec.device] * self.counts[self.rank]
            backend = group_backend([d if d.startswith("cuda") else None for d in devices])
            group = join_group(spec.group_store, self.replica, self.counts[self.rank], backend, self.cfg.peer_timeout,
                               self.device)
        if group is None:
            return None
        self.real_step.average_gradients = group.average_gradients
        if self.replica > 0 and self.real_step.rng_seed is not None:
            # dropout and stochastic depth: a shard's masks must not repeat replica 0's, so the others draw from
            # streams of their own (replica 0 keeps the module's stream, which the checkpoint holds; a resume reseeds)
            self.real_step.rng_seed += REPLICA_STREAMS * self.replica + self.spec.start_step
            self.real_step.rng_state = None
        if self.cfg.sync_bn:
            convert_sync_bn(self.local.module, group.group, collective)  # a replica gone mid-step is a lost peer
            convert_sync_bn(self.local.head, group.group, collective)
        return group

    @property
    def in_endpoints(self) -> list[str]:
        """The bound input addresses (with the real port when bound to tcp port '*')."""
        return [receiver.endpoint for receiver in self.receivers]

    def connect(self, out_endpoints: list[str], report_endpoint: str, out_links: list[LinkKind] | None = None) -> None:
        """Connect to the input links of the next stage's replicas this one sends to, and to the coordinator."""
        if len(out_endpoints) != len(self.targets):
            raise ValueError(f"{self.spec.name} sends to {len(self.targets)} replicas but was given "
                             f"{len(out_endpoints)} output links")
        out_links = out_links or [LinkKind.ZMQ] * len(out_endpoints)
        self.senders = [Sender(self.ctx, endpoint, kind, self.cfg.depth, self.cfg.peer_timeout,
                               peer=Worker(self.rank + 1, target).name(self.counts), keys=self.spec.keys)
                        for endpoint, kind, target in zip(out_endpoints, out_links, self.targets)]
        # a tensor that is a view of a received slot is copied before it goes to the thread: the credit returned once
        # its handler ends lets the previous stage overwrite the slot (the stage steps' outputs are their own)
        self.outbox = Outbox(self.senders, sends_in_background(self.device.type),
                             borrowed=lambda t: any(receiver.holds(t) for receiver in self.receivers), trace=self.trace)
        self.reporter = Reporter(self.ctx, report_endpoint, self.rank, self.spec.keys, self.spec.worker)
        self.heartbeat = Heartbeat(self.ctx, report_endpoint, self.rank, self.spec.keys, self.spec.worker)

    # --- the loop -----------------------------------------------------------------

    def run(self) -> None:
        self.reporter.send({"kind": Record.READY, "pid": os.getpid(), "host": host_id(),
                            "fingerprint": self.fingerprint})
        self.heartbeat.start()
        if self.rank == 0:
            self._feed()
        else:
            self._relay()
        self.outbox.finish()
        if self.group is not None:
            self.group.finish()
        self.reporter.send({"kind": Record.DONE, "busy": self.busy, "idle": self.idle, "peak_memory": self.peak_memory(),
                            "link": self.senders[0].kind.value if self.senders else None,
                            "trace": self.trace.take()})

    def peak_memory(self) -> int:
        """This stage's peak memory in bytes: allocated on its GPU, or the process's resident set on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def _feed(self) -> None:
        """Stage 1: draw the batches, train, and send results on; evaluation and checkpoint markers when due."""
        probe = probe_batch(self.data, self.cfg.probe_size, self.device) if self.probing else None
        # replicas of stage 1 draw the same batches and decode only their own rows' images; labels come whole
        part = None if self.counts[0] == 1 else functools.partial(shard, count=self.counts[0], replica=self.replica)
        for _, _, steps in run_epochs(self.cfg, self.data, self.steps_per_epoch, self.spec.start_step, self.device,
                                      part):
            for s in steps:  # images uint8 to the device, normalised there; labels on the host
                header = {"epoch": s.epoch, "step": s.step}
                batch = {"x": s.x, "y": rows_of(s.y, part), "image": s.image}  # image: InfoPro's losses only
                self._train({"kind": Kind.TRAIN, "rows": len(s.y), **header}, batch)
                if s.evaluate:
                    for bx, by in bank_batches(self.data, knn_bank_size(self.cfg), self.cfg.eval_batch_size, self.device):
                        self._bank({"kind": Kind.BANK, "epoch": s.epoch, "step": s.step, "rows": len(by)}, {"x": bx, "y": by})
                    for ex, ey in eval_batches(self.data, self.cfg.eval_batch_size, self.device, part):
                        self._eval({"kind": Kind.EVAL, "rows": len(ey), **header}, {"x": ex, "y": rows_of(ey, part)})
                    self._eval_end({"kind": Kind.EVAL_END, **header}, {} if probe is None else dict(zip("xy", probe)))
                if s.checkpoint:
                    self._checkpoint({"kind": Kind.CHECKPOINT, **header}, {})
        self._stop({"kind": Kind.STOP}, {})

    def _relay(self) -> None:
        """Stages 2..K: handle messages in arrival order until `stop` (one from each sender, merged in row order)."""
        handlers = {Kind.TRAIN: self._train, Kind.BANK: self._bank, Kind.EVAL: self._eval, Kind.EVAL_END: self._eval_end,
                    Kind.CHECKPOINT: self._checkpoint, Kind.STOP: self._stop}
        while True:
            start = now()
            messages: list[Message] = [receiver.recv() for receiver in self.receivers]
            end = now()
            self.idle += end - start
            header, tensors = merge(messages)
            self.trace.add("input", start, end, header.get("step"))
            kind = Kind(header["kind"])
            handlers[kind](header, tensors)
            for receiver, message in zip(self.receivers, messages):
                receiver.done(message)  # the message's tensors are the producer's again
            if kind is Kind.STOP:
                return

    # --- message handlers: (header, tensors by name), the same in stage 1 and in stages 2..K ----------

    # Labels `y` and InfoPro's images arrive and leave on the host (placement.HOST_TENSORS); each handler moves its
    # own copy to the device.

    def _train(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        x, y, image = tensors["x"], tensors["y"], tensors.get("image")
        start = now()
        image_here = to_device(image, self.device) if self.real_step.needs_image else None
        result = self.step.train_step(x, tensors.get("delta"), to_device(y, self.device), image_here)
        self.heartbeat.step = header["step"]  # a failure's message then names the step within a beat
        self.meter.update(0, result.stats)
        end = now()
        self.busy += end - start
        self.trace.add("train", start, end, header["step"])
        self._send({"kind": Kind.TRAIN, "epoch": header["epoch"], "step": header["step"], "rows": header["rows"]},
                   {"x": result.out, "delta": result.delta, "y": y, "image": image if self.flow.sends_image else None})
        if self.group is not None:
            self._keep_replicas_equal(header["step"])
        if header["step"] % self.cfg.log_every == 0 or header["step"] % self.steps_per_epoch == 0:
            if self.group is not None:
                self._sum_meter()
            lr = self.step.optimizer.param_groups[0]["lr"]
            for record in train_records(self.meter, header["epoch"], header["step"], [lr]) if self.lead else ():
                queue = self.outbox.pending()  # handed over, not yet done downstream
                self.reporter.send({"kind": Record.TRAIN, "record": record, "busy": self.busy, "idle": self.idle,
                                    "queue": queue, "trace": self.trace.take()})
            self.meter.reset()

    def _keep_replicas_equal(self, step: int) -> None:
        """After a step: per-shard BatchNorm takes replica 0's running statistics (as DDP does), and every
        `checksum_every` steps the replicas compare their weights."""
        modules = [self.local.module, self.local.head]
        if not self.cfg.sync_bn:
            self.group.broadcast_buffers(modules)
        if self.cfg.checksum_every and step % self.cfg.checksum_every == 0:
            self.group.check_same(modules, f"stage {self.rank + 1}", step)

    def _sum_meter(self) -> None:
        """The replicas' meters summed, so replica 0 reports the stage's loss and accuracy on whole batches."""
        m, n = self.meter, self.counts[self.rank]
        loss, sgr, correct, count = self.group.all_sum([m.loss[0], m.sgr[0], m.correct[0], m.count[0]])
        m.loss[0], m.sgr[0], m.correct[0], m.count[0] = loss / n, sgr / n, int(correct), int(count)

    def _bank(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """A k-NN bank batch: the module keeps its features (Barlow Twins) and passes its output on."""
        start = now()
        out = self.step.remember(tensors["x"], to_device(tensors["y"], self.device))
        self.trace.add("eval", start, now(), header["step"])
        self._send(header, {"x": out, "y": tensors["y"]})

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
        counts = self.group.all_sum(self.eval_counts) if self.group is not None else self.eval_counts
        correct1, correct5, count = (int(c) for c in counts)
        delta_loss, probe = None, {}
        if "x" in tensors:  # the probe batch follows the replicas 0 (routes: their shards always overlap)
            out, delta_loss = self.probe(self.real_step, tensors["x"], to_device(tensors["y"], self.device))
            probe = {"x": out, "y": tensors["y"]}
        self.trace.add("eval", start, now(), header["step"])
        if self.lead:
            self.reporter.send({"kind": Record.EVAL, "epoch": header["epoch"], "step": header["step"],
                                "acc": correct1 / max(1, count), "top5": correct5 / max(1, count),
                                "delta_loss": delta_loss})
        self.eval_counts = [0, 0, 0]
        self.step.forget()
        self._send(header, probe)

    def _checkpoint(self, header: dict[str, Any], _tensors: dict[str, torch.Tensor]) -> None:
        """Save this module's state after the training batch the marker follows, then pass the marker on."""
        start = now()
        self.meter.check_finite()  # a NaN since the last log must not reach a sealed checkpoint
        check_finite(self.real_step, self.rank + 1)  # nor an inf in a weight or BatchNorm statistic
        if self.lead:  # every replica holds the same weights
            path = checkpoint_dir(Path(self.cfg.out), header["step"]) / f"stage{self.rank + 1}.pt"
            save_atomic(stage_state(self.real_step, self.device, self.probe.previous_input), path)
            self.reporter.send({"kind": Record.SAVED, "epoch": header["epoch"], "step": header["step"]})
        self.trace.add("checkpoint", start, now(), header["step"])
        self._send(header, {})

    def _stop(self, header: dict[str, Any], _tensors: dict[str, torch.Tensor]) -> None:
        """Training is over: pass `stop` on (the loop then drains the link and reports done)."""
        self._send(header, {})

    def _send(self, header: dict[str, Any], tensors: dict[str, torch.Tensor | None]) -> None:
        """Pass a message on to every replica of the next stage this one feeds, each with its rows; evaluation and
        probe batches use the links' evaluation windows, so they never hold back the training batch that follows
        them (no evaluation bubble at the default depth)."""
        if not self.senders:  # the last stage
            return
        start = now()
        parcels = [(sender, header, self._rows_for(target, header, tensors))
                   for sender, target in zip(self.senders, self.targets)]
        waited = self.outbox.send(parcels, Kind(header["kind"]).training)
        end = now()
        self.idle += end - start
        self.trace.add_send(start, waited, end, header.get("step"))

    def _rows_for(self, target: int, header: dict[str, Any],
                  tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """What replica `target` of the next stage gets: its rows of a batch, the probe batch (replicas 0 only),
        the marker alone otherwise."""
        if not tensors or (len(self.senders) == 1 and self.counts[self.rank + 1] == 1):
            return tensors  # one receiver of whole batches: no slicing at all (the pipeline without replicas)
        if "rows" not in header:  # the probe batch on `eval_end`
            return tensors if (self.replica, target) == (0, 0) else {}
        start, end = rows_to(header["rows"], self.replica, self.counts[self.rank], target, self.counts[self.rank + 1])
        return {name: None if t is None else t[start:end] for name, t in tensors.items()}

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.outbox is not None:
            self.outbox.close()  # and the senders
        for part in (*self.receivers, self.reporter):
            if part is not None:
                part.close()
        if self.group is not None and self.own_group and dist.is_initialized():
            dist.destroy_process_group()


def merge(messages: list[Message]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One message from the messages of every sender (the same kind and step from each): their tensors' rows
    concatenated in sender order. A tensor only one sender sent (the probe batch) passes as it is."""
    header = messages[0].header
    for message in messages[1:]:
        if (message.header["kind"], message.header.get("step")) != (header["kind"], header.get("step")):
            raise RuntimeError(f"replicas out of step: {header['kind']} of step {header.get('step')} from one sender, "
                               f"{message.header['kind']} of step {message.header.get('step')} from another")
    if len(messages) == 1:
        return header, messages[0].tensors
    names = dict.fromkeys(name for message in messages for name in message.tensors)
    tensors = {}
    for name in names:
        parts = [message.tensors[name] for message in messages if name in message.tensors]
        tensors[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return header, tensors


class Interrupted(Exception):
    """A stage stopped by SIGINT, as its one-line report says."""


# errors whose message says all (bad data, a NaN, a full disk, a file that cannot be written, replicas that diverged,
# a lost neighbour): reported, then exit 1 without a traceback; anything else is a bug, and its traceback is printed
SAID_IN_ONE_LINE = (DataError, FloatingPointError, DiskFull, RunFileError, ReplicasDiverged, PeerLost, CheckpointError)


def report_error(err: BaseException, worker: StageWorker | None, spec: StageSpec, ctx: zmq.Context) -> str:
    """Send `err` to the coordinator as one line (through the worker's reporter, or a short-lived one if it failed
    before connecting and the coordinator's endpoint is known); the line."""
    line = f"{type(err).__name__}: {err}"
    if worker is not None and worker.reporter is not None:
        worker.reporter.send({"kind": Record.ERROR, "error": line, "trace": worker.trace.take()})
    elif spec.report_endpoint is not None:  # closed at once, so that ctx.term() cannot block
        reporter = Reporter(ctx, spec.report_endpoint, spec.rank, spec.keys, spec.worker)
        reporter.send({"kind": Record.ERROR, "error": line})
        reporter.close()
    return line


def _end_on_sigterm(signum: int, _frame: Any) -> None:
    """SIGTERM (the launcher stopping the run, or `exit_with`): unlink this process's shared memory, then die of it."""
    remove_segments(os.getpid())
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def stage_main(spec: StageSpec) -> None:
    """Entry point of a stage process: run the worker; report any error to the coordinator, then re-raise."""
    signal.signal(signal.SIGTERM, _end_on_sigterm)
    restore_interrupts()
    if spec.environment is not None:  # before any CUDA call: CUDA_VISIBLE_DEVICES as the launcher sees it now
        adopt_environment(spec.environment)
    if spec.launcher_pid is not None:
        exit_with(spec.launcher_pid, its_temp_dir=True)  # a launcher killed with SIGKILL cannot stop its stages itself
    ctx = zmq.Context()
    worker, said, interrupted = None, None, False
    try:
        worker = StageWorker(spec, ctx)
        worker.connect(spec.out_endpoints, spec.report_endpoint, spec.out_links)
        worker.run()
    except KeyboardInterrupt:
        # Ctrl-C in the terminal reached the launcher too, which stops the run; a SIGINT sent to this process alone is
        # reported, so that the launcher names it at once instead of waiting for a record that never comes
        report_error(Interrupted("stopped by SIGINT (Ctrl-C)"), worker, spec, ctx)
        interrupted = True
    except BaseException as err:
        line = report_error(err, worker, spec, ctx)
        if not isinstance(err, SAID_IN_ONE_LINE):
            raise
        said = line
    finally:
        if worker is not None:
            worker.close()
        ctx.destroy(linger=LINGER_MS)  # pending records get LINGER_MS to leave; never blocks longer
    if said is not None:  # its line, in case the record did not reach the launcher; a traceback would add nothing
        print(f"{spec.name}: {said}", file=sys.stderr, flush=True)
        sys.exit(1)
    if interrupted:
        sys.exit(130)
