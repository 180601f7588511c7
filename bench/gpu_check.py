"""The prepared GPU check: every CUDA path of the project, run once on one GPU, in one table.

`scripts/gpu_check.sh` runs `tests/gpu/` and then this script. Each check runs the real code
(the launcher, stage processes, the transport) and compares what can be compared exactly.
With `--dry-run` every check runs its CPU half (same code, `--device cpu`, the smallest sizes)
and the table says what was left out; CI runs that, so the script cannot rot between the rare
sessions that have a GPU. Several stages share the one GPU; the whole check takes a few minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/gpu_check.py`

import torch
import zmq

from bench.common import markdown_table
from pipeline.checkpoint import complete_checkpoints, complete_checkpoints_quiet, read_stage_file
from workers.placement import LinkKind, link_endpoint
from workers.transport import Receiver, Sender

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "digits", "--stages", "3", "--method", "sgr", "--batch-size", "32", "--threads", "1",
         "--no-progress", "--set", "train_subset=384", "--set", "eval_every=6", "--set", "probe_size=64",
         "--set", "log_every=4"]  # the default job, reduced: 12 steps an epoch
STRESS_MESSAGES = 300
STOP_GRACE_S = 20  # a launcher stops its stages within a few seconds of SIGTERM


class CheckFailed(AssertionError):
    """A check ran but what it compares differs."""


class OutOfTime(BaseException):
    """SIGTERM (scripts/gpu_check.sh's time limit): stop the check under way, print the table of what finished."""


def _out_of_time(_signum: int, _frame: object) -> None:
    raise OutOfTime("stopped by the time limit")


# --- transport stress between three processes ------------------------------------------------------------


def stress_tensors(i: int, device: str) -> dict[str, torch.Tensor]:
    """Message i's tensors: the layouts and dtypes a link must carry (values depend on i)."""
    g = torch.Generator().manual_seed(i)
    base = torch.randn(6, 8, 5, 5, generator=g)
    return {
        "channels_last": base.to(device).contiguous(memory_format=torch.channels_last),
        "offset_view": base.to(device).reshape(-1)[7 : 7 + 200].view(8, 25),  # a view with a storage offset
        "bf16": base.to(device, torch.bfloat16),
        "int64": torch.randint(0, 1000, (33,), generator=g).to(device),
        "empty": torch.empty(0, 4, device=device),
    }


def checksum(t: torch.Tensor) -> str:
    """A digest of a tensor's values, dtype and shape (computed on the host)."""
    flat = t.detach().contiguous().cpu().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return hashlib.sha1(data + f"{t.dtype}{tuple(t.shape)}".encode()).hexdigest()


def written_late(tensors: dict[str, torch.Tensor], sleep_cycles: int = 2_000_000) -> dict[str, torch.Tensor]:
    """The same GPU tensors, zeroed and then given their values back by copies queued behind a GPU sleep (~1 ms by
    default), with nothing waited for: a consumer that opens them without waiting for the producer's event reads 0."""
    saved = {name: t.clone() for name, t in tensors.items()}
    for t in tensors.values():
        t.zero_()
    torch.cuda._sleep(sleep_cycles)
    for name, t in tensors.items():
        t.copy_(saved[name])
    return tensors


def _stress_producer(endpoint: str, device: str, kind: LinkKind) -> None:
    """Send STRESS_MESSAGES messages; on a GPU each is sent while the kernels writing it still wait behind a sleep."""
    ctx = zmq.Context()
    sender = Sender(ctx, endpoint, kind, depth=2, timeout_s=60)
    for i in range(STRESS_MESSAGES):
        tensors = stress_tensors(i, device)
        sums = {n: checksum(t) for n, t in tensors.items()}  # on the host: this waits, the values are final here
        if device.startswith("cuda"):
            tensors = written_late(tensors)
        sender.send({"i": i, "sums": sums}, tensors)
    sender.drain()
    sender.close()
    ctx.destroy(linger=1000)


def _stress_middle(in_endpoint: str, out_endpoint: str, device: str, kind: LinkKind) -> None:
    """Forward every message: the received tensors as they are (they cannot be re-shared) and copies of its own."""
    ctx = zmq.Context()
    receiver = Receiver(ctx, in_endpoint, timeout_s=60, device=torch.device(device))
    sender = Sender(ctx, out_endpoint, kind, depth=2, timeout_s=60)
    for _ in range(STRESS_MESSAGES):
        message = receiver.recv()
        tensors = dict(message.tensors)
        tensors.update({f"copy_{n}": t.clone() for n, t in message.tensors.items()})
        sender.send(message.header, tensors)
        receiver.done(message)
    sender.drain()
    sender.close()
    receiver.close()
    ctx.destroy(linger=1000)


def check_transport(device: str) -> str:
    """Three processes, producer -> middle -> consumer, checksums compared at the consumer: on a GPU over CUDA IPC
    and over shared memory (what a link uses where the IPC check fails), on the CPU over shared memory."""
    kinds = [LinkKind.CUDA_IPC, LinkKind.SHARED_MEMORY] if device.startswith("cuda") else [LinkKind.SHARED_MEMORY]
    for kind in kinds:
        _stress(device, kind)
    return f"{STRESS_MESSAGES} messages x 10 tensors intact ({', '.join(kind.value for kind in kinds)})"


def _stress(device: str, kind: LinkKind) -> None:
    """One stress run over links of `kind`."""
    tmp = tempfile.mkdtemp(prefix="sgr-gpucheck-")
    links = [link_endpoint(kind, tmp, "a"), link_endpoint(kind, tmp, "b")]
    ctx = zmq.Context()
    receiver = Receiver(ctx, links[1], timeout_s=120, device=torch.device(device))
    spawn = mp.get_context("spawn")
    processes = [spawn.Process(target=_stress_middle, args=(links[0], links[1], device, kind)),
                 spawn.Process(target=_stress_producer, args=(links[0], device, kind))]
    for p in processes:
        p.start()
    try:
        for i in range(STRESS_MESSAGES):
            message = receiver.recv()
            if message.header["i"] != i:
                raise CheckFailed(f"message {message.header['i']} arrived in place of {i}")
            for name, expected in message.header["sums"].items():
                for got in (message.tensors[name], message.tensors[f"copy_{name}"]):
                    if checksum(got) != expected:
                        raise CheckFailed(f"message {i}: tensor {name} arrived changed")
            receiver.done(message)
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        receiver.close()
        ctx.destroy(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)
    bad = [p.exitcode for p in processes if p.exitcode != 0]
    if bad:
        raise CheckFailed(f"a {kind.value} transport process exited with {bad}")


# --- runs of launch.py ----------------------------------------------------------------------------------------


def run_child(command: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """subprocess.run, except that a time limit or OutOfTime stops the child as Ctrl-C would (SIGTERM to its session,
    SIGKILL only if it is still there after STOP_GRACE_S): a launcher killed outright leaves its stages writing on
    into the check's folder after that folder is removed."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):  # it may have ended just before (OutOfTime must still rise)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def launch(*args: str, env: dict[str, str] | None = None, torchrun: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run launch.py (under torchrun with that many processes) and fail the check on a non-zero exit."""
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)] \
        if torchrun else [sys.executable]
    proc = run_child([*prefix, "launch.py", *args], timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode != 0:
        raise CheckFailed(f"launch.py {' '.join(args[:6])} ... exited {proc.returncode}: "
                          f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    return proc


def final_states(run_dir: Path) -> list[dict]:
    """Every stage's state at the run's newest checkpoint."""
    last = complete_checkpoints(run_dir)[-1]
    return [read_stage_file(last.path / name) for name in sorted(last.manifest["files"])]


def max_difference(a: list[dict], b: list[dict]) -> float:
    """The largest absolute difference between two runs' module and head weights (0.0: equal to the bit)."""
    worst = 0.0
    for sa, sb in zip(a, b, strict=True):
        for part in ("module", "head"):
            for name, t in sa[part].items():
                if t.is_floating_point():
                    worst = max(worst, float((t.double() - sb[part][name].double()).abs().max()))
                elif not torch.equal(t, sb[part][name]):
                    worst = float("inf")
    return worst


def gpu_args(device: str) -> list[str]:
    """The GPU run's options (bf16, channels_last on a GPU; fp32 on the CPU, where bf16 is slow)."""
    if device.startswith("cuda"):
        return ["--device", "cuda:0", "--set", "amp=bf16", "--set", "channels_last=true"]
    return ["--device", "cpu"]


def run_args(device: str) -> list[str]:
    """The runs compared to the bit: the reduced default job, deterministic, a checkpoint half-way."""
    return [*SMALL, *gpu_args(device), "--epochs", "1", "--set", "deterministic=true", "--set", "checkpoint_every=6"]


def check_pipeline_equals_sequential(device: str, tmp: Path) -> str:
    """With `deterministic: true` the K-process pipeline equals the one-process reference to the bit."""
    for schedule in ("pipeline", "sequential"):
        launch(*run_args(device), "--out", str(tmp / schedule), "--schedule", schedule)
    diff = max_difference(final_states(tmp / "pipeline"), final_states(tmp / "sequential"))
    if diff != 0.0:
        raise CheckFailed(f"pipeline and sequential differ by up to {diff:.3g}")
    return "pipeline == sequential to the bit"


def check_transports_agree(device: str, tmp: Path) -> str:
    """`transport: auto` (CUDA IPC on one GPU: the pipeline run above) and `transport: zmq` give the same run."""
    if not device.startswith("cuda"):
        return "GPU only (on the CPU, tests/workers/test_pipeline.py runs shm and zmq against the reference)"
    launch(*run_args(device), "--out", str(tmp / "zmq"), "--set", "transport=zmq")
    diff = max_difference(final_states(tmp / "pipeline"), final_states(tmp / "zmq"))
    if diff != 0.0:  # deterministic kernels: how the bytes travel must not change a single bit
        raise CheckFailed(f"transport auto and zmq differ by up to {diff:.3g}")
    return "auto (CUDA IPC) == zmq to the bit"


def check_kill_and_resume(device: str, tmp: Path) -> str:
    """Kill the launcher and every stage after the first checkpoint, resume, compare with the uninterrupted run."""
    run_dir = tmp / "killed"
    proc = subprocess.Popen([sys.executable, "launch.py", *run_args(device), "--out", str(run_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    try:
        while not complete_checkpoints_quiet(run_dir) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    except BaseException:  # the time limit (OutOfTime): this run has a session of its own, so nothing else stops it
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)  # as a crash would: no stage gets to clean up
    proc.communicate(timeout=60)
    kept = complete_checkpoints(run_dir)[-1].step
    if killed:
        launch("--resume", str(run_dir), "--no-progress")
    diff = max_difference(final_states(run_dir), final_states(tmp / "pipeline"))
    if diff != 0.0:
        raise CheckFailed(f"the resumed run differs from the uninterrupted one by up to {diff:.3g}")
    return f"killed after step {kept}, resumed == uninterrupted" if killed else "the run ended before the kill"


def check_torchrun(device: str, tmp: Path) -> str:
    """`torchrun --nproc-per-node 3 launch.py --device cuda`: three ranks sharing the one GPU."""
    cuda = ["--device", "cuda"] if device.startswith("cuda") else ["--device", "cpu"]
    proc = launch(*SMALL, *cuda, "--epochs", "1", "--out", str(tmp / "torchrun"), torchrun=3)
    summary = json.loads((tmp / "torchrun" / "summary.json").read_text())
    return f"3 ranks, final accuracy {100 * summary['final_test_acc']:.1f}%" + (
        "" if "final test accuracy" in proc.stdout else " (no final line?)")


def check_plan_and_peaks(device: str, tmp: Path) -> str:
    """`launch.py plan` on the device, and the per-stage peak memory the pipeline run above put in summary.json."""
    plan = launch("plan", *SMALL, *gpu_args(device)[:2], "--set", "split=auto")
    cuts = next(line for line in plan.stdout.splitlines() if line.startswith("cuts ["))
    summary = json.loads((tmp / "pipeline" / "summary.json").read_text())
    kind, peaks = summary["peak_memory_kind"], summary["peak_memory_bytes"]
    expected = "cuda_max_allocated" if device.startswith("cuda") else "cpu_max_rss"
    if kind != expected or len(peaks) != 3 or min(peaks) <= 0:
        raise CheckFailed(f"summary.json has peak memory {peaks} of kind {kind}")
    return f"{cuts.split(':')[0]}; peaks {' / '.join(f'{p / 2**20:.0f}' for p in peaks)} MiB ({kind})"


def check_imagenet_bench(device: str, tmp: Path) -> str:
    """bench/imagenet_gpu.py at its check size (--smoke on the CPU): samples/s and memory per stage against BP."""
    size = "--check" if device.startswith("cuda") else "--smoke"
    proc = run_child([sys.executable, "bench/imagenet_gpu.py", size, "--out", str(tmp / "imagenet")], timeout=400)
    if proc.returncode != 0:
        raise CheckFailed(f"bench/imagenet_gpu.py exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    results = json.loads((tmp / "imagenet" / "results.json").read_text())
    rows = results["rows"]
    if not rows or not {"meta", "steps", "warmup_steps"} <= results.keys():
        raise CheckFailed(f"bench/imagenet_gpu.py wrote results.json with keys {sorted(results)}")
    print(proc.stdout.strip(), flush=True)  # its own table, above ours
    return "; ".join(f"{r['model']} {r['speedup']:.2f}x BP speed" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the CPU half of every check (no GPU needed)")
    p.add_argument("--suite", default="not run", help="the last line of pytest tests/gpu (scripts/gpu_check.sh passes it)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; run with --dry-run for the CPU half of the checks", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda:0"
    tmp = Path(tempfile.mkdtemp(prefix="sgr-gpucheck-runs-"))
    checks: list[tuple[str, Callable[[], str]]] = [
        ("transport stress, 3 processes", lambda: check_transport(device)),
        ("K=3 pipeline vs sequential", lambda: check_pipeline_equals_sequential(device, tmp)),
        ("K=3 transport auto vs zmq", lambda: check_transports_agree(device, tmp)),
        ("kill a stage, resume", lambda: check_kill_and_resume(device, tmp)),
        ("torchrun --nproc-per-node 3", lambda: check_torchrun(device, tmp)),
        ("plan + peak memory", lambda: check_plan_and_peaks(device, tmp)),
        ("bench/imagenet_gpu.py", lambda: check_imagenet_bench(device, tmp)),
    ]
    suite_ok = args.dry_run or (" passed" in args.suite and "failed" not in args.suite and "error" not in args.suite)
    rows, failed = [["pytest tests/gpu", "pass" if suite_ok else "FAIL", args.suite, "-"]], int(not suite_ok)
    signal.signal(signal.SIGTERM, _out_of_time)  # a check's child is stopped on the way out (run_child)
    try:
        for i, (name, check) in enumerate(checks):
            start, out_of_time = time.time(), False
            try:
                result, detail = "pass", check()
            except (Exception, OutOfTime) as err:  # any failure is a row of the table; the table must print
                result, detail = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:200]
                failed += 1
                out_of_time = isinstance(err, OutOfTime)
            rows.append([name, result, detail, f"{time.time() - start:.0f}"])
            print(f"{name}: {result} ({detail})", file=sys.stderr, flush=True)
            if out_of_time:
                rows += [[later, "not run", "the time limit ran out before it", "-"] for later, _ in checks[i + 1:]]
                break
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the checks' runs and checkpoints
    where = "dry run on the CPU (CPU halves only)" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"GPU check, {where}; torch {torch.__version__}")
    print(markdown_table(["check", "result", "detail", "s"], rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
