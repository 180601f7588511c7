"""The coordinator's side of a pipeline run: collects stage records into the run directory and the live view.

Stages push msgpack records (train statistics, per-head evaluation counts, ready/done/error);
the coordinator writes them to metrics.jsonl in the same format as the sequential trainer,
assembles each epoch's evaluation from all heads, and shows one progress bar. With replicas,
replica 0 of a stage reports for the stage; every process sends ready, heartbeats, done or its
error, and is told apart by its index among the run's processes (`worker`, routes.workers order).
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import zmq
from tqdm import tqdm

from pipeline.config import Config, barlow_twins_losses
from pipeline.metrics import eval_record, format_eval
from pipeline.rundir import RunWriter
from workers.messages import Record
from workers.routes import workers
from workers.security import RunKeys
from workers.trace import write_trace
from workers.transport import Collector


class StageFailed(RuntimeError):
    """A stage process died or reported an error; the message names the stage (and the replica)."""


PAUSE_S = 2.0  # a launcher loop that looks at the clock every 0.1 s and saw a gap this long was itself paused


class Coordinator:
    """Owns the run directory and the live view of a K-stage pipeline."""

    def __init__(self, cfg: Config, stages: int, steps_per_epoch: int, ctx: zmq.Context, endpoint: str,
                 start_step: int = 0, keys: RunKeys | None = None, counts: list[int] | None = None) -> None:
        self.cfg, self.stages = cfg, stages
        self.counts = counts or [1] * stages  # replicas per stage
        self.workers = workers(self.counts)  # every process; records name theirs by index (`worker`)
        self.records = Collector(ctx, endpoint, keys)
        self.endpoint = self.records.endpoint
        self.run_dir = Path(cfg.out)
        self.writer = RunWriter(cfg, self.run_dir, start_step)
        # counted in steps, shown in images: the rate reads as the pipeline's throughput in img/s
        self.bar = tqdm(total=steps_per_epoch * cfg.epochs, initial=start_step, desc=f"pipeline K={stages}",
                        unit="img", unit_scale=cfg.batch_size, disable=not cfg.progress, dynamic_ncols=True)
        self.done: dict[int, dict[str, Any]] = {}  # worker -> its `done` record
        self.errors: dict[int, str] = {}  # worker -> its error
        self.last_step = [start_step] * stages
        self.last_seen: dict[int, float] = {}  # worker -> when it last sent anything (from its `ready` on)
        self.where: dict[int, tuple[str, int]] = {}  # worker -> (host id, pid), from its `ready`
        self.last_tick = self.paused_until = time.monotonic()
        self.fingerprint: dict[str, Any] = {}
        self.saved: dict[int, set[int]] = {}  # step -> stages that saved their part of its checkpoint
        self.last_checkpoint = start_step if start_step else None
        self.latest: dict[int, str] = {}
        self.evals: dict[int, dict[int, dict[str, Any]]] = {}  # step -> stage -> its head's evaluation
        self.result: dict[str, Any] = {}
        self.timeline: list[tuple[float, int, int, float, float]] = []  # train reports: (arrival, stage, step, busy s, idle s)
        self.spans: dict[int, list[list[Any]]] = {}  # stage -> its replica 0's trace spans so far (trace: true)
        self.trace_written = False
        self.handlers = {Record.READY: self._on_ready, Record.TRAIN: self._on_train, Record.EVAL: self._on_eval,
                         Record.SAVED: self._on_saved, Record.BEAT: self._on_beat, Record.DONE: self._on_done,
                         Record.ERROR: self._on_error}

    def poll(self, timeout_ms: int) -> None:
        """Handle every record that arrives within `timeout_ms`."""
        self._tick()
        while self.records.wait(timeout_ms):
            self._tick(timeout_ms / 1000)  # a pause inside the wait shows here, before what queued up during it
            self.handle(self.records.recv())
            timeout_ms = 0
        self._tick(timeout_ms / 1000)

    def _tick(self, waited_s: float = 0.0) -> float:
        """Now; a gap since the previous tick longer than PAUSE_S (plus a wait we asked for) means this
        process itself was stopped (SIGSTOP, a suspended laptop, a swapped-out launcher): silence during
        it proves nothing, so every stage counts as seen at the gap's end."""
        now = time.monotonic()
        if now - self.last_tick > waited_s + PAUSE_S:
            self.paused_until = now
        self.last_tick = now
        return now

    def handle(self, msg: dict[str, Any]) -> None:
        """One record from a process: note that it is alive, then hand the record to its kind's handler."""
        self.last_seen[msg.get("worker", msg["stage"])] = time.monotonic()
        self.handlers[Record(msg["kind"])](msg["stage"], msg)

    def _on_ready(self, stage: int, msg: dict[str, Any]) -> None:
        self.where[msg.get("worker", stage)] = (msg["host"], msg["pid"])
        if stage == 0:
            self.fingerprint = msg["fingerprint"]

    def _keep_spans(self, stage: int, msg: dict[str, Any]) -> None:
        """The trace spans a record brings (train reports, `done`, `error`; only replica 0 of a stage traces)."""
        if msg.get("trace"):
            self.spans.setdefault(stage, []).extend(msg["trace"])

    def _on_train(self, stage: int, msg: dict[str, Any]) -> None:
        self._keep_spans(stage, msg)
        record = msg["record"]
        self.timeline.append((time.perf_counter(), stage, record["step"], msg["busy"], msg["idle"]))
        self.writer.record(record)
        self.last_step[stage] = max(self.last_step[stage], record["step"])  # a beat may have told a later one
        busy = msg["busy"] / max(1e-9, msg["busy"] + msg["idle"])
        self.latest[stage] = (f"S{stage + 1} {record['loss']:.3f}/{100 * record['acc']:.0f}% "
                              f"busy {100 * busy:.0f}% q{msg['queue']}")
        if stage == self.stages - 1:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix_str(" | ".join(self.latest[k] for k in sorted(self.latest)), refresh=False)

    def _on_eval(self, stage: int, msg: dict[str, Any]) -> None:
        step_evals = self.evals.setdefault(msg["step"], {})
        step_evals[stage] = msg
        if len(step_evals) == self.stages:
            self._write_eval(msg["epoch"], msg["step"], [step_evals[k] for k in range(self.stages)])
            del self.evals[msg["step"]]

    def _on_saved(self, stage: int, msg: dict[str, Any]) -> None:
        savers = self.saved.setdefault(msg["step"], set())
        savers.add(stage)
        if len(savers) == self.stages:
            self._seal_checkpoint(msg["epoch"], msg["step"])

    def _on_beat(self, stage: int, msg: dict[str, Any]) -> None:
        """Beyond `last_seen`, which every record updates: the last step the process trained (train records come
        every log_every steps, and from replica 0 only), so a failure names the step it came after."""
        if msg["step"] is not None:  # None before its first step
            self.last_step[stage] = max(self.last_step[stage], msg["step"])

    def _on_done(self, stage: int, msg: dict[str, Any]) -> None:
        self._keep_spans(stage, msg)
        self.done[msg.get("worker", stage)] = msg

    def _on_error(self, stage: int, msg: dict[str, Any]) -> None:
        self._keep_spans(stage, msg)
        self.errors[msg.get("worker", stage)] = msg["error"]

    def _seal_checkpoint(self, epoch: int, step: int) -> None:
        """Every stage saved its part of step `step`'s checkpoint: write the manifest (last), prune old ones."""
        test_acc = self.result["final_test_acc"] if self.result.get("step") == step else None
        self.writer.seal(step, epoch, self.fingerprint, self.stages, test_acc)
        self.last_checkpoint = step
        del self.saved[step]

    def silent_stage(self, timeout_s: float) -> int | None:
        """A started process (worker index) that has sent nothing, not even a heartbeat, for `timeout_s` seconds
        (hung), if any.

        Start-up (loading data, building the model) is not judged: a stage that dies there is seen
        by its exit, and one that stalls there leaves its neighbours without messages (peer_timeout).
        """
        now = self._tick()
        silent = [k for k, seen in self.last_seen.items()
                  if k not in self.done and now - max(seen, self.paused_until) > timeout_s]
        return silent[0] if silent else None

    def _write_eval(self, epoch: int, step: int, per_stage: list[dict[str, Any]]) -> None:
        acc, top5 = [m["acc"] for m in per_stage], [m["top5"] for m in per_stage]
        self.writer.record(eval_record(epoch, step, acc, top5, [m["delta_loss"] for m in per_stage]))
        self.bar.write(format_eval(step, acc, knn=barlow_twins_losses(self.cfg)))
        self.result = {"final_test_acc": acc[-1], "test_acc": acc, "test_top5": top5, "step": step}

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.workers)

    def failure(self, worker: int, how: str) -> StageFailed:
        """The error for a dead process: which stage (and replica), how it ended, at which step, its own error, and
        how to resume."""
        stage = self.workers[worker].stage
        error = self.errors.get(worker)
        detail = f": {error}" if error else ""
        if error and error.startswith("CheckpointError:"):  # the checkpoint it was to resume from is the problem
            resume = ""
        elif self.last_checkpoint is not None:
            resume = f"; checkpoint of step {self.last_checkpoint} kept: resume with --resume {self.run_dir}"
        else:
            resume = "; no checkpoint yet"
        return StageFailed(f"{self.workers[worker].name(self.counts)} {how} after step {self.last_step[stage]}"
                           f"{detail}{resume}")

    def finish(self, seconds: float) -> dict[str, Any]:
        """Close the live view and write summary.json; the returned summary also holds the `timeline` of train reports.

        Per stage: busy fraction (mean over its replicas), peak memory (the largest replica's), and the kind of
        its replica 0's first link on (zmq, shm, cuda_ipc)."""
        self._close_view()
        done = [[self.done[w] for w, worker in enumerate(self.workers) if worker.stage == k] for k in range(self.stages)]
        busy = [sum(d["busy"] / max(1e-9, d["busy"] + d["idle"]) for d in ds) / len(ds) for ds in done]
        result = {**self.result, "seconds": round(seconds, 1), "busy_fraction": [round(b, 3) for b in busy],
                  "peak_memory_bytes": [max(d["peak_memory"] for d in ds) for ds in done],
                  "peak_memory_kind": "cuda_max_allocated" if self.cfg.device.startswith("cuda") else "cpu_max_rss",
                  "links": [ds[0]["link"] for ds in done][:-1], "replicas": self.counts}
        self.writer.summary(result)
        if self.cfg.trace:
            write_trace(self.run_dir / "trace.json", self.spans)
            self.trace_written = True
        return {**result, "timeline": self.timeline}

    def save_partial_trace(self) -> None:
        """A traced run that will not finish: write the spans that have arrived, marked incomplete (once; nothing if
        none came). A failure to write them is a warning: the run's own error is what the user needs."""
        if not self.cfg.trace or self.trace_written or not self.spans:
            return
        self.trace_written = True
        try:
            # a copy (atomic under the GIL): under torchrun the watcher thread may still be adding spans
            write_trace(self.run_dir / "trace.json", dict(self.spans), complete=False)
        except OSError as err:  # RunFileError, DiskFull too
            print(f"warning: the trace of this run could not be written: {err}", file=sys.stderr)

    def close(self) -> None:
        """Save a traced run's partial trace if it did not finish, then close the live view, the run's files and the
        records' socket."""
        try:
            self.save_partial_trace()
        finally:
            self._close_view()
            self.writer.close()
            self.records.close()

    def _close_view(self) -> None:
        """Close the progress bar; a terminal or pipe that has gone (SIGHUP, the end of `| tee` closed) loses the
        view only, never the run's files."""
        with contextlib.suppress(OSError):
            self.bar.close()
