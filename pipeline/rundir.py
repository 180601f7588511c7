"""A run directory: its lock, and the one writer of what a run puts in it.

One run per run directory: an exclusive lock held for the life of a run. Two launchers writing
one directory would interleave metrics.jsonl and mix one run's config with the other's
checkpoints; `--fresh` from a second launcher would delete a live run's records. The lock is an
`flock` on RUN_DIR/.lock: the kernel drops it when the process exits, however it exits, so a
killed run never leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any

import yaml

from pipeline.checkpoint import (Checkpoint, CheckpointError, checkpoint_dir, fingerprint, latest_checkpoint, prune,
                                 write_manifest, write_text_atomic)
from pipeline.config import FIELDS, Config
from pipeline.metrics import JsonlLog, read_jsonl, truncate_after

LOCK_FILE = ".lock"
# what a run and the tools on it leave in its directory besides config.yaml and the lock: `--fresh` removes all of it,
# so nothing of the earlier run (a trace, an export, a probe's result) passes for the new one's
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "trace.json", "plots", "tensorboard", "model.pt",
               "linear_probe.jsonl", "linear_probe.json")


def lock_run_dir(run_dir: Path) -> IO[str]:
    """Take the run directory's lock (creating the directory); keep the returned file open for the run's life."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+")
    except OSError as err:
        raise CheckpointError(f"--out {run_dir} cannot be a run directory ({err.strerror}); "
                              "give a writable folder") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise CheckpointError(f"{run_dir} is in use by another run (pid {holder}); wait for it to end, stop it, "
                              "or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a run's directory: its config.yaml, and the lock or a checkpoint folder a run leaves."""
    left = (path / LOCK_FILE).exists() or any((path / "checkpoints").glob("step*"))
    return (path / "config.yaml").is_file() and left


def written_by_a_run(config: Path) -> bool:
    """Whether `config` reads as the config.yaml a run writes: a mapping of run config keys, model, method and out
    among them (another tool's config.yaml is not, nor a damaged file)."""
    try:
        values = yaml.safe_load(Path(config).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(values, dict) and {"model", "method", "out"} <= values.keys() <= FIELDS.keys()


def clear_outputs(run_dir: Path) -> None:
    """Remove what an earlier run left in `run_dir` (RUN_OUTPUTS); refused in a folder that is not a run's (no
    config.yaml, or one a run did not write), where files of those names are someone else's."""
    found = [name for name in RUN_OUTPUTS if (Path(run_dir) / name).exists()]
    config = Path(run_dir) / "config.yaml"
    if found and not config.is_file():
        raise CheckpointError(f"--fresh deletes a run's outputs, but {run_dir} is not a run directory (no config.yaml) "
                              f"and holds {', '.join(found)}: choose another --out")
    if found and not written_by_a_run(config):
        raise CheckpointError(f"--fresh deletes a run's outputs, but {config} is not a run's config (not a mapping of "
                              f"this project's config keys) and {run_dir} holds {', '.join(found)}: choose another "
                              "--out, or delete those by hand if they are an old run's")
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def resume_checkpoint(cfg: Config, cuts: list[int], fix: str | None = None) -> Checkpoint:
    """The checkpoint the run in `cfg.out` continues from: its newest good one, trained with this model and split
    (else CheckpointError, ending in `fix` if given). metrics.jsonl must read: a resumed run cuts it back to that
    step."""
    run_dir = Path(cfg.out)
    records = run_dir / "metrics.jsonl"
    if records.exists():
        try:
            read_jsonl(records)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{err}; " + (fix or "repair it or move it away, then resume")) from None
    if fix is None:
        return latest_checkpoint(run_dir, fingerprint(cfg, cuts))
    return latest_checkpoint(run_dir, fingerprint(cfg, cuts), fix, start_over=fix)


class RunWriter:
    """What a run writes, for the sequential trainer and the pipeline's coordinator alike: config.yaml,
    metrics.jsonl (cut back to the checkpoint a run resumes from), sealed checkpoints, summary.json."""

    def __init__(self, cfg: Config, run_dir: Path, start_step: int = 0) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        truncate_after(self.run_dir / "metrics.jsonl", start_step)  # records a dead run wrote after its checkpoint
        self.log = JsonlLog(self.run_dir / "metrics.jsonl", cfg.tensorboard)

    def record(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl (and its TensorBoard scalars)."""
        self.log.write(record)

    def seal(self, step: int, epoch: int, fingerprint: dict[str, Any], stages: int, test_acc: float | None) -> None:
        """Every stage file of step `step` is on disk: write its manifest (which makes it a checkpoint), prune old ones."""
        write_manifest(checkpoint_dir(self.run_dir, step), step, epoch, fingerprint, stages, test_acc)
        prune(self.run_dir, self.cfg.keep_checkpoints, sealed=step)

    def summary(self, result: dict[str, Any]) -> None:
        write_text_atomic(self.run_dir / "summary.json", json.dumps(result, indent=1),
                          fix=f"free some space; the run's checkpoints are saved (`launch.py evaluate {self.run_dir}`)")

    def close(self) -> None:
        self.log.close()
