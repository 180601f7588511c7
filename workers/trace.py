"""A trace of the schedule (`trace: true`): when each stage trained, waited and sent, as one Chrome-trace file.

Every stage records spans on the host's monotonic clock (comparable between processes on one
host); they travel to the coordinator with the stage's train reports and its `done` or `error`
record, and the coordinator writes RUN_DIR/trace.json when the run ends, a failed one too (then
with what had arrived: a stage killed outright loses the spans since its last report). Open it in
https://ui.perfetto.dev or chrome://tracing: one row per stage, and under it one for a CPU stage's
outbox thread (its waits for credit and its sends). `launch.py trace RUN_DIR` prints where each
stage's own time went.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

SPANS = ("input", "train", "credit", "send", "eval", "checkpoint")  # waiting to receive, a training step,
# waiting for the next stage's credit (a CPU stage: for room in its outbox), sending (a CPU stage: handing the message
# to its outbox), an evaluation batch or the probe, saving a checkpoint
BUSY = ("train", "eval", "checkpoint")
# a CPU stage's outbox thread (workers/outbox.py), on a row of its own under the stage's: waiting for the next stage's
# credit, and writing a message into its link
OUTBOX_SPANS = ("link_credit", "link_send")
OUTBOX_ROW = 1000  # stage k's outbox spans go on row OUTBOX_ROW + k


class Tracer:
    """Collects one stage's spans as [name, start µs, duration µs, step]; does nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.spans: list[list[Any]] = []

    def add(self, name: str, start_s: float, end_s: float, step: int | None = None) -> None:
        """A span between two readings of time.perf_counter() (the system-wide monotonic clock on Linux)."""
        if self.enabled:
            start, end = round(start_s * 1e6), round(end_s * 1e6)  # rounded alike: spans that follow never overlap
            self.spans.append([name, start, end - start, step])

    def add_send(self, start_s: float, waited_s: float, end_s: float, step: int | None,
                 names: tuple[str, str] = ("credit", "send")) -> None:
        """A send that waited `waited_s` for room first: the wait (when there was one), then the send itself."""
        wait, send = names
        if waited_s:
            self.add(wait, start_s, start_s + waited_s, step)
        self.add(send, start_s + waited_s, end_s, step)

    def take(self) -> list[list[Any]] | None:
        """The spans recorded since the last take, handed over (None when disabled)."""
        if not self.enabled:
            return None
        spans, self.spans = self.spans, []
        return spans


def now() -> float:
    """The clock every span is read from."""
    return time.perf_counter()


def chrome_trace(spans_by_stage: dict[int, list[list[Any]]], complete: bool = True) -> dict[str, Any]:
    """The Chrome trace-event JSON of every stage's spans: complete events, one thread (row) per stage; `otherData`
    says whether the run finished (a failed run's trace holds the spans that had reached the coordinator)."""
    events: list[dict[str, Any]] = []
    for stage, spans in sorted(spans_by_stage.items()):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": stage, "args": {"name": f"stage {stage + 1}"}})
        if any(span[0] in OUTBOX_SPANS for span in spans):
            events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": OUTBOX_ROW + stage,
                           "args": {"name": f"stage {stage + 1} outbox"}})
        for name, start, duration, step in spans:
            row = OUTBOX_ROW + stage if name in OUTBOX_SPANS else stage
            events.append({"name": name, "cat": name, "ph": "X", "pid": 0, "tid": row, "ts": start, "dur": duration,
                           "args": {} if step is None else {"step": step}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"complete": complete}}


def write_trace(path: Path, spans_by_stage: dict[int, list[list[Any]]], complete: bool = True) -> None:
    # imported here: the pipeline package imports torch, which `launch.py trace` (this module's reader) never needs
    from pipeline.checkpoint import write_text_atomic

    write_text_atomic(path, json.dumps(chrome_trace(spans_by_stage, complete)))


def is_complete(trace: dict[str, Any]) -> bool:
    """Whether the traced run finished (traces written before this mark was kept count as finished)."""
    return bool(trace.get("otherData", {}).get("complete", True))


def summarize(trace: dict[str, Any]) -> list[dict[str, float]]:
    """Per stage, % of the run's traced wall time (first span of any stage to last): busy (train, eval,
    checkpoint), of which training; waiting for input; waiting for credit; other (sending, Python). The stage's own
    thread is summed up; its outbox's row is not."""
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    if not spans:
        return []
    for e in spans:
        times = (e["ts"], e["dur"])
        if not all(isinstance(t, (int, float)) and math.isfinite(t) for t in times) or e["dur"] < 0:
            raise ValueError(f"a {e['name']!r} span has ts {e['ts']!r} and dur {e['dur']!r}, which are not times")
    start = min(e["ts"] for e in spans)
    wall = max(e["ts"] + e["dur"] for e in spans) - start
    if not 0 < wall < math.inf:  # ts + dur can overflow to inf in a hand-edited file
        raise ValueError(f"its spans cover {wall} µs, not a positive length of time")
    own = [e for e in spans if e["name"] in SPANS]  # the stages' own threads (not their outboxes' rows)
    rows = []
    for stage in sorted({e["tid"] for e in own}):
        total = {name: 0 for name in SPANS}
        for e in own:
            if e["tid"] == stage:
                total[e["name"]] += e["dur"]
        busy = sum(total[name] for name in BUSY)
        share = {name: 100 * t / wall for name, t in total.items()}
        rows.append({"stage": stage + 1, "wall_s": wall / 1e6, "busy": 100 * busy / wall, "train": share["train"],
                     "input": share["input"], "credit": share["credit"],
                     "other": 100 - 100 * busy / wall - share["input"] - share["credit"]})
    return rows
