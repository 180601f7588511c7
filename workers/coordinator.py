"""The coordinator's side of a pipeline run: collects stage records into the run directory and the live view.

Stages push msgpack records (train statistics, per-head evaluation counts, ready/done/error);
the coordinator writes them to metrics.jsonl in the same format as the sequential trainer,
assembles each epoch's evaluation from all heads, and shows one progress bar.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import yaml
import zmq
from tqdm import tqdm

from pipeline.config import Config
from pipeline.metrics import JsonlLog, eval_record, format_eval


class StageFailed(RuntimeError):
    """A stage process died or reported an error; the message names the stage."""


class Coordinator:
    """Owns the run directory and the live view of a K-stage pipeline."""

    def __init__(self, cfg: Config, stages: int, steps_per_epoch: int, ctx: zmq.Context, endpoint: str) -> None:
        self.cfg, self.stages = cfg, stages
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.run_dir = Path(cfg.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.log = JsonlLog(self.run_dir / "metrics.jsonl")
        self.bar = tqdm(total=steps_per_epoch * cfg.epochs, desc=f"pipeline K={stages}", disable=not cfg.progress,
                        dynamic_ncols=True)
        self.done: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, str] = {}
        self.last_step = [0] * stages
        self.latest: dict[int, str] = {}
        self.evals: dict[int, dict[int, dict[str, Any]]] = {}
        self.result: dict[str, Any] = {}

    def poll(self, timeout_ms: int) -> None:
        """Handle every record that arrives within `timeout_ms`."""
        while self.socket.poll(timeout_ms, zmq.POLLIN):
            self.handle(msgpack.unpackb(self.socket.recv(), raw=False))
            timeout_ms = 0

    def handle(self, msg: dict[str, Any]) -> None:
        stage, kind = msg["stage"], msg["kind"]
        if kind == "train":
            record = msg["record"]
            self.log.write(record)
            self.last_step[stage] = record["step"]
            busy = msg["busy"] / max(1e-9, msg["busy"] + msg["idle"])
            self.latest[stage] = f"S{stage + 1} {record['loss']:.3f}/{100 * record['acc']:.0f}% busy {100 * busy:.0f}%"
            if stage == self.stages - 1:
                self.bar.update(record["step"] - self.bar.n)
                self.bar.set_postfix_str(" | ".join(self.latest[k] for k in sorted(self.latest)), refresh=False)
        elif kind == "eval":
            epoch_evals = self.evals.setdefault(msg["epoch"], {})
            epoch_evals[stage] = msg
            if len(epoch_evals) == self.stages:
                self._write_eval(msg["epoch"], msg["step"], [epoch_evals[k] for k in range(self.stages)])
        elif kind == "done":
            self.done[stage] = msg
        elif kind == "error":
            self.errors[stage] = msg["error"]

    def _write_eval(self, epoch: int, step: int, per_stage: list[dict[str, Any]]) -> None:
        acc, top5 = [m["acc"] for m in per_stage], [m["top5"] for m in per_stage]
        self.log.write(eval_record(epoch, step, acc, top5))
        self.bar.write(format_eval(step, acc))
        self.result = {"final_test_acc": acc[-1], "test_acc": acc, "test_top5": top5, "step": step}

    @property
    def finished(self) -> bool:
        return len(self.done) == self.stages

    def failure(self, stage: int, how: str) -> StageFailed:
        """The error for a dead stage: which stage, how it ended, at which step, and its own error if it sent one."""
        error = self.errors.get(stage)
        detail = f": {error}" if error else ""
        return StageFailed(f"stage {stage + 1} {how} after step {self.last_step[stage]}{detail}")

    def finish(self, seconds: float) -> dict[str, Any]:
        """Close the live view and write summary.json."""
        self.bar.close()
        busy = [self.done[k]["busy"] / max(1e-9, self.done[k]["busy"] + self.done[k]["idle"]) for k in sorted(self.done)]
        result = {**self.result, "seconds": round(seconds, 1), "busy_fraction": [round(b, 3) for b in busy]}
        (self.run_dir / "summary.json").write_text(json.dumps(result, indent=1))
        return result

    def close(self) -> None:
        self.bar.close()
        self.log.close()
        self.socket.close()
