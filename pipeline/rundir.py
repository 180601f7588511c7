"""One run per run directory: an exclusive lock held for the life of a run.

Two launchers writing one directory would interleave metrics.jsonl and mix one run's config with
the other's checkpoints; `--fresh` from a second launcher would delete a live run's records. The
lock is an `flock` on RUN_DIR/.lock: the kernel drops it when the process exits, however it
exits, so a killed run never leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from pipeline.checkpoint import CheckpointError

LOCK_FILE = ".lock"


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
