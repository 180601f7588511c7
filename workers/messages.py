"""The vocabulary between processes: what a stage sends the next stage, and what it tells the coordinator.

Both travel as msgpack maps with a `kind` field (the enums' values); receivers dispatch through
a table of handlers keyed by these enums, so an unknown kind is an error, never a silent skip.
"""
from __future__ import annotations

from enum import Enum


class Kind(str, Enum):
    """Messages along the pipeline (stage k -> k+1), in the order stage 1 places them."""

    TRAIN = "train"  # a training batch: x, δ (where the next module needs it), y
    BANK = "bank"  # a k-NN bank batch (training images, Barlow Twins' modules keep their features) before the test set
    EVAL = "eval"  # an evaluation batch after training batch `step`: x, y
    EVAL_END = "eval_end"  # the evaluation after `step` is complete; carries the ΔL_k probe batch, if any
    CHECKPOINT = "checkpoint"  # save the module as it is after training batch `step`
    STOP = "stop"  # training is over: pass it on, drain, report done

    @property
    def training(self) -> bool:
        """Whether the message counts against the link's training window (the rest have one of their own)."""
        return self is Kind.TRAIN


class Record(str, Enum):
    """Records from a stage to the coordinator."""

    READY = "ready"  # started; carries the run's fingerprint
    TRAIN = "train"  # training statistics every log_every steps, with busy/idle seconds and the queue length
    EVAL = "eval"  # one head's evaluation counts and ΔL_k
    SAVED = "saved"  # this stage's part of a checkpoint is on disk
    BEAT = "beat"  # alive (from the stage's heartbeat thread, once a second)
    DONE = "done"  # finished: busy/idle totals, peak memory, its out link's kind
    ERROR = "error"  # failed: the error's one line
