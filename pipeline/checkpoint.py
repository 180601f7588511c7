"""Checkpoints on disk: one file per stage, written atomically, and a manifest written last.

A checkpoint of training step t is the folder RUN_DIR/checkpoints/step{t:08d} holding
stage{k}.pt (module, head, optimizer, scheduler and RNG state of module k after batch t) and
manifest.json, which lists each stage file's size and SHA-256. Only a folder whose manifest
exists, is well formed and names its own step, and whose stage files have the sizes it lists,
counts: a run killed while saving leaves a torn folder that resume skips. Before a checkpoint is
resumed, exported or evaluated its files are checked against their SHA-256; one that fails is
skipped with a warning and the previous one is used. The same
format serves the pipeline (each stage process writes its own file) and the sequential
trainer (one process writes them all).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.config import Config
from pipeline.step import StageStep

MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A run directory that cannot be resumed; the message says why and what to do."""


@dataclass
class Checkpoint:
    """A complete checkpoint: its folder and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return self.manifest["step"]

    def stage_file(self, k: int) -> Path:
        return self.path / f"stage{k + 1}.pt"


class DiskFull(OSError):
    """A write that ran out of disk space; the message names the file and the space it needs."""


class RunFileError(OSError):
    """A file of a run that could not be written for another reason; the message (strerror) names it."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the one line, without OSError's "[Errno N]"


RESUME_AFTER_DISK_FULL = "free some space (or choose another --out) and resume"


def disk_full(path: Path, needed: int | None = None, fix: str = RESUME_AFTER_DISK_FULL) -> DiskFull:
    """The one-line error for a write to `path` that found no space left (`needed`: bytes it would have taken)."""
    free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    need = f", about {needed / 2**20:.1f} MiB needed" if needed else ""
    return DiskFull(f"disk full writing {path}: {free / 2**20:.1f} MiB free{need}; {fix}")


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor inside nested dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_atomic(obj: Any, path: Path, fix: str = RESUME_AFTER_DISK_FULL) -> None:
    """torch.save to a temporary file, fsync, then rename: a reader never sees a torn file.

    A full disk is one line naming the file and the space it needs (torch.save itself reports
    it as `unexpected pos`) and `fix`; any other failure to write (a read-only folder, say) a RunFileError naming
    the file. The temporary file is removed, the previous checkpoints stay.
    """
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):  # the folder may refuse this too
            tmp.unlink(missing_ok=True)
        needed = tensor_bytes(obj)
        if getattr(err, "errno", None) == errno.ENOSPC or (path.parent.is_dir() and
                                                          shutil.disk_usage(path.parent).free < needed):
            raise disk_full(path, needed, fix) from None
        if isinstance(err, OSError):
            raise RunFileError(err.errno, f"cannot write {path}: {err.strerror}") from None
        raise


def write_text_atomic(path: Path, text: str, fix: str = RESUME_AFTER_DISK_FULL) -> None:
    """Write a small text file of a run through a temporary file and a rename: a full disk leaves the old file whole
    and is one line (DiskFull, with `fix`); any other failure to write is a RunFileError naming the file."""
    path = Path(os.path.realpath(path))  # a symlinked file (to shared storage) stays one: its target is replaced
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise disk_full(path, len(text.encode()), fix) from None
        raise RunFileError(err.errno, f"cannot write {path}: {err.strerror}") from None


def stage_state(step: StageStep, device: torch.device, probe_input: torch.Tensor | None = None) -> dict[str, Any]:
    """Everything module k needs to continue exactly: what the step stores of itself (`StageStep.state_dict`), the
    process's random state and the module's ΔL_k probe input."""
    state = {"probe_input": probe_input, **step.state_dict(), "rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def check_finite(step: StageStep, module: int) -> None:
    """Refuse to checkpoint module `module` (1-based) if any parameter or buffer is NaN or infinite.

    A sealed checkpoint is what a failed run is resumed from, so non-finite state must never reach
    one. One host sync for the whole module.
    """
    tensors = {f"{part}.{name}": t for part, owner in (("module", step.module), ("head", step.head))
               for name, t in owner.state_dict().items() if t.is_floating_point()}
    if not tensors:
        return
    finite = torch.stack([t.isfinite().all() for t in tensors.values()]).tolist()
    bad = [name for name, ok in zip(tensors, finite) if not ok]
    if bad:
        raise FloatingPointError(f"module {module}'s {bad[0]} is not finite ({len(bad)} tensor(s) in all); "
                                 "this state is not checkpointed: lower lr or lam")


def read_stage_file(path: Path) -> dict[str, Any]:
    """A stage file's state, every tensor on the CPU (weights_only: no code runs on load).

    Loading to the CPU and letting each `load_state_dict` place what it owns keeps Adam's `step`
    counters on the CPU, as in a fresh run; loaded onto a GPU they would cost two host syncs per
    parameter per step.
    """
    return torch.load(path, map_location="cpu", weights_only=True)


def load_stage_state(step: StageStep, path: Path, device: torch.device) -> torch.Tensor | None:
    """Restore a stage file into a freshly built StageStep on `device`; returns the probe input (on `device`).

    A file that loads but does not hold this module's state (its checksums pass, so it was written so, or the
    run's config.yaml was edited) is a CheckpointError naming the file and the first thing that did not fit.
    """
    try:
        state = read_stage_file(path)
        if not isinstance(state, dict):
            raise TypeError(f"it holds a {type(state).__name__}, not a dict of states")
        step.load_state_dict(state)
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        probe_input = state["probe_input"]
        return None if probe_input is None else probe_input.to(device)
    except torch.OutOfMemoryError:  # the file may be fine: the device is full
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, KeyError, IndexError,
            AttributeError) as err:
        raise CheckpointError(f"{path} does not hold this module's state ({gist(err)}); resume, export or evaluate "
                              "with the config the run was trained with, or from another checkpoint") from None


def gist(err: BaseException, limit: int = 200) -> str:
    """An error's type and its first informative line (torch's load_state_dict error starts with a heading)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    informative = [line for line in lines if not line.endswith(":")] or lines
    text = informative[0] if informative else ""
    return f"{type(err).__name__}: {text[:limit]}" if text else type(err).__name__


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step{step:08d}"


def fingerprint(cfg: Config, cuts: list[int]) -> dict[str, Any]:
    """What a checkpoint's weights depend on: a resumed run must match it exactly."""
    run = {"model": cfg.model, "model_args": cfg.model_args, "cuts": list(cuts), "stages": len(cuts) + 1,
           "method": cfg.method, "dataset": cfg.dataset, "train_subset": cfg.train_subset, "head": cfg.head,
           "last_head": cfg.last_head, "local_loss": cfg.local_loss, "batch_size": cfg.batch_size,
           "optimizer": cfg.optimizer}
    # the keys below only where they shape what is stored: a key only one side has is not compared (latest_checkpoint)
    if cfg.dataset in ("imagefolder", "synthetic"):  # the others have their own image size
        run.update(image_size=cfg.image_size)
    if "conv_linear" in (cfg.head, cfg.last_head):
        run.update(head_width=cfg.head_width)
    if cfg.probe_size:  # the ΔL_k probe's batch is in the checkpoint; a probe turned on or off resumes
        run.update(probe_size=cfg.probe_size)
    if cfg.local_loss == "barlow_twins":  # its projectors' shapes
        run.update(projector_width=cfg.projector_width)
    return run


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: Path, step: int, epoch: int, run_fingerprint: dict[str, Any], stages: int,
                   test_acc: float | None) -> None:
    """Seal a checkpoint: list each stage file with its size and SHA-256, then write the manifest atomically."""
    files = {}
    for k in range(stages):
        file = path / f"stage{k + 1}.pt"
        files[file.name] = {"bytes": file.stat().st_size, "sha256": file_digest(file)}
    manifest = {"step": step, "epoch": epoch, "fingerprint": run_fingerprint, "files": files, "test_acc": test_acc}
    write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=1))


def manifest_problem(path: Path, manifest: Any) -> str:
    """What is wrong with a parsed manifest's shape ('' if nothing): a hand-edited or foreign file is not trusted."""
    if not isinstance(manifest, dict):
        return "the manifest is not a JSON object"
    step, files = manifest.get("step"), manifest.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        return f"the manifest's step is {step!r}, not a positive integer"
    if path.name != f"step{step:08d}":
        return f"the manifest says step {step} but the folder is {path.name} (edited?)"
    if not isinstance(manifest.get("fingerprint"), dict):
        return "the manifest has no fingerprint"
    if not isinstance(files, dict) or not files:
        return "the manifest lists no stage files"
    if set(files) != {f"stage{k + 1}.pt" for k in range(len(files))}:
        return f"the manifest lists {sorted(files)}, not stage1.pt..stage{len(files)}.pt"
    for name, entry in files.items():
        size = entry.get("bytes") if isinstance(entry, dict) else entry  # format 1 listed sizes only
        if not isinstance(size, int) or isinstance(size, bool) or (isinstance(entry, dict)
                                                                  and not isinstance(entry.get("sha256"), str)):
            return f"the manifest's entry for {name} is {entry!r}"
    return ""


def _read(path: Path) -> tuple[Checkpoint | None, str]:
    """The checkpoint in `path`, or None and why it is torn or malformed (sizes only: cheap, no file is read)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None, "no readable manifest (still being written, or interrupted while saving)"
    problem = manifest_problem(path, manifest)
    if problem:
        return None, problem
    for name, entry in manifest["files"].items():
        file = path / name
        size = entry["bytes"] if isinstance(entry, dict) else entry
        if not file.exists() or file.stat().st_size != size:
            return None, f"{name} is missing or truncated"
    return Checkpoint(path, manifest), ""


def verify(checkpoint: Checkpoint) -> str:
    """Why a checkpoint's stage files are not the ones its manifest sealed ('' if they are)."""
    for name, entry in checkpoint.manifest["files"].items():
        if isinstance(entry, dict) and file_digest(checkpoint.path / name) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted on disk)"
    return ""


def _scan(run_dir: Path) -> list[tuple[Path, Checkpoint | None, str]]:
    root = Path(run_dir) / "checkpoints"
    folders = sorted(p for p in root.glob("step*") if p.is_dir()) if root.is_dir() else []
    return [(p, *_read(p)) for p in folders]


def complete_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Every complete checkpoint of a run, oldest first; torn or malformed ones are skipped with a warning."""
    found = []
    for path, checkpoint, why in _scan(run_dir):
        if checkpoint is None:
            warnings.warn(f"skipping checkpoint {path}: {why}", stacklevel=2)
        else:
            found.append(checkpoint)
    return found


@contextlib.contextmanager
def warnings_printed() -> Iterator[None]:
    """Print each warning the block raises (a checkpoint skipped, and why) as one `warning: ...` line on stderr, as
    the command-line tools print errors; also when the block fails, before its error is reported."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)


START_OVER = "start the run over (its training command, with --fresh)"


def newest_good_checkpoint(run_dir: Path, start_over: str = START_OVER) -> Checkpoint:
    """The newest complete checkpoint whose files match their checksums; each one that fails is warned about (none
    left: CheckpointError ending in `start_over`)."""
    why = ""
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        problem = verify(checkpoint)
        if not problem:
            return checkpoint
        warnings.warn(f"skipping checkpoint {checkpoint.path}: {problem}", stacklevel=2)
        why = why or f"{checkpoint.path.name}: {problem}"
    if not why:  # no complete one: the newest torn folder says why
        why = next((f"{path.name}: {reason}" for path, found, reason in reversed(_scan(run_dir)) if found is None), "")
    raise CheckpointError(f"{run_dir} has no complete, uncorrupted checkpoint" + (f" (newest: {why})" if why else "")
                          + f"; {start_over}")


RESUME_FIX = "resume with the run's own config or start a new run with a different --out"


def latest_checkpoint(run_dir: Path, expected: dict[str, Any], fix: str = RESUME_FIX,
                      start_over: str = START_OVER) -> Checkpoint:
    """The newest good checkpoint of `run_dir`, refused (with `fix` in the message) if it was trained with a
    different model or split than `expected` says (keys a manifest predates are not compared)."""
    latest = newest_good_checkpoint(run_dir, start_over)
    saved = latest.manifest["fingerprint"]
    differ = [key for key in expected if key in saved and saved[key] != expected[key]]
    if differ:
        was = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        now = ", ".join(f"{k}={expected[k]!r}" for k in differ)
        raise CheckpointError(f"{run_dir} was trained with {was}, but this config has {now}; {fix}")
    return latest


def prune(run_dir: Path, keep_last: int, sealed: int | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best by test accuracy.

    With `sealed` (the step whose checkpoint was just sealed), also delete the folders a run left while it died
    saving: a step folder without a manifest, older than `sealed`. Checkpoints are sealed in step order, so such a
    folder is never one still being written (a newer one may be: it is left alone).
    """
    scanned = _scan(run_dir)
    complete = [c for _, c, _ in scanned if c is not None]
    scored = [c for c in complete if c.manifest.get("test_acc") is not None]
    best = max(scored, key=lambda c: c.manifest["test_acc"]).path if scored else None
    for c in complete[: max(0, len(complete) - keep_last)]:
        if c.path != best:
            shutil.rmtree(c.path, ignore_errors=True)
    if sealed is None:
        return
    for path, checkpoint, _ in scanned:
        torn = re.fullmatch(r"step(\d{8})", path.name) and not (path / MANIFEST).exists()
        if checkpoint is None and torn and int(path.name[4:]) < sealed:
            shutil.rmtree(path, ignore_errors=True)


def complete_checkpoints_quiet(run_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints of a run, oldest first, without warning about torn ones."""
    return [c for _, c, _ in _scan(run_dir) if c is not None]
