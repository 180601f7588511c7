"""Which rows of a batch each replica of a stage holds, and which links join the replicas of neighbouring stages.

Stage k runs `counts[k]` replicas. Each splits every batch of `rows` rows into equal contiguous
shards, replica r holding rows `shard(rows, count, r)`. Replica s of stage k sends to replica r of
stage k+1 exactly the rows both hold, so a link exists where their shards overlap (with equal
counts: lane r -> r; with unequal ones a replica may receive from two senders). Pure functions,
tested on the CPU; the launcher and the stage worker ask them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pipeline.config import ConfigError, per_stage


@dataclass(frozen=True)
class Worker:
    """One process of a replicated pipeline: replica `replica` of stage `stage` (both 0-based)."""

    stage: int
    replica: int

    def name(self, counts: Sequence[int]) -> str:
        """'stage 2', or 'stage 2 replica 1' where the stage has several replicas (1-based, as users count)."""
        text = f"stage {self.stage + 1}"
        return text if counts[self.stage] == 1 else f"{text} replica {self.replica + 1}"


def replica_counts(replicas: int | list[int], stages: int) -> list[int]:
    """The config's `replicas` (one count for every stage, or one per stage) as a list of K counts; `auto` must have
    been planned into counts before (launch.py, or run_torchrun)."""
    if replicas == "auto":
        raise ConfigError("replicas: auto has not been planned into counts yet (launch.py plans it before the run)")
    counts = per_stage(replicas, stages, "replicas")
    if any(c < 1 for c in counts):
        raise ConfigError(f"replicas must be >= 1 per stage, got {counts}")
    return counts


def check_batch(batch_size: int, counts: Sequence[int]) -> None:
    """Every replica's training shard has the same number of rows, at least 2 (BatchNorm needs them)."""
    uneven = [c for c in counts if batch_size % c]
    if uneven:
        raise ConfigError(f"batch_size {batch_size} does not split evenly over {max(uneven)} replicas; "
                          f"use a multiple of every count in replicas {list(counts)}")
    if batch_size // max(counts) < 2:
        raise ConfigError(f"batch_size {batch_size} over {max(counts)} replicas leaves shards of "
                          f"{batch_size // max(counts)} row(s); BatchNorm needs 2: raise batch_size")


def workers(counts: Sequence[int]) -> list[Worker]:
    """Every process of the run, stage by stage: the order of spawned processes and of torchrun ranks."""
    return [Worker(k, r) for k, count in enumerate(counts) for r in range(count)]


def shard(rows: int, count: int, replica: int) -> tuple[int, int]:
    """The rows [start, end) of a batch of `rows` that replica `replica` of `count` holds (any rows; even if divisible)."""
    return replica * rows // count, (replica + 1) * rows // count


def linked(sender: int, sender_count: int, receiver: int, receiver_count: int) -> bool:
    """Whether sender's shard overlaps receiver's, as fractions of a batch (so for every batch size)."""
    return sender * receiver_count < (receiver + 1) * sender_count and receiver * sender_count < (sender + 1) * receiver_count


def receivers_of(sender: int, sender_count: int, receiver_count: int) -> list[int]:
    """The replicas of the next stage that replica `sender` sends to, in order."""
    return [r for r in range(receiver_count) if linked(sender, sender_count, r, receiver_count)]


def senders_of(receiver: int, receiver_count: int, sender_count: int) -> list[int]:
    """The replicas of the previous stage that replica `receiver` receives from, in row order."""
    return [s for s in range(sender_count) if linked(s, sender_count, receiver, receiver_count)]


def rows_to(rows: int, sender: int, sender_count: int, receiver: int, receiver_count: int) -> tuple[int, int]:
    """The rows [start, end) of sender's shard (counted within it) that go to `receiver`; may be empty."""
    s_start, s_end = shard(rows, sender_count, sender)
    r_start, r_end = shard(rows, receiver_count, receiver)
    start, end = max(s_start, r_start), min(s_end, r_end)
    return (start - s_start, end - s_start) if start < end else (0, 0)
