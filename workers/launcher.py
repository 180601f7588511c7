"""Starting and supervising the stage processes: one code path for `python launch.py` and torchrun.

- One launcher process (plain python, or torchrun with one process per node): it spawns the
  stage processes itself (K, or one per replica with `replicas`), runs the coordinator, and stops
  every stage as soon as one dies.
- torchrun with K processes: each process is one stage (rank = stage, LOCAL_RANK picks the
  GPU); endpoints are exchanged through torch.distributed's store, so the same command works
  across nodes; rank 0 also runs the coordinator.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import zmq

from pipeline.checkpoint import Checkpoint
from pipeline.config import Config, ConfigError
from pipeline.data import Data, DataShape, data_shape
from pipeline.lifeline import forkserver, interrupts_deferred, process_alive
from pipeline.plan import plan_replicas
from pipeline.syncbn import init_process_group
from workers.coordinator import Coordinator, StageFailed
from workers.ipc_check import cuda_ipc_error
from workers.placement import LinkEnd, LinkKind, host_id, link_endpoint, link_kind, stage_device, torchrun_world
from workers.replicas import ReplicaGroup, group_backend
from workers.routes import Worker, check_batch, receivers_of, replica_counts, senders_of, workers
from workers.security import STORE_KEY as SECURITY_STORE_KEY, RunKeys, new_run_keys, start_authenticator
from workers.stage import SAID_IN_ONE_LINE, StageSpec, StageWorker, report_error, stage_main
from workers.transport import PeerLost, gpu_uuids, remove_segments

STOP_GRACE_S = 3.0
IPC_PREFIX = "sgr-"  # the launcher's folder of ipc sockets under the temp dir
LAUNCHER_PID = "launcher.pid"  # in that folder: who made it, so a later launcher can tell it is stale
# A failing stage sends its error record, then exits: about a second apart when idle, several seconds on a
# loaded host. The launcher waits up to this long for whichever of the two comes second (a guard, not a pause).
END_WAIT_S = 30.0
CAUSE_WAIT_S = 1.0  # after a first failure, how long the launcher lets the others' exits settle before naming one


def visible_gpus(cfg: Config) -> int:
    """How many GPUs this process sees (0 for a CPU run: no CUDA call at all)."""
    return torch.cuda.device_count() if cfg.device.startswith("cuda") else 0


def spawned_devices(cfg: Config, processes: int) -> list[str]:
    """Each process's device when one launcher spawns them all (they see this process's GPUs), in routes.workers
    order: process i on GPU i mod #GPUs, or on `gpus[i]`."""
    visible = visible_gpus(cfg)
    return [stage_device(cfg.device, cfg.gpus, i, visible) for i in range(processes)]


def auto_replicas(cfg: Config, shape: DataShape, stages: int, gpus: int, device: str) -> list[int]:
    """`replicas: auto`: the planner's counts for the run's modules on `gpus` devices (pipeline/plan.plan_replicas),
    measured in a child process so that no CUDA memory stays with this one. One per stage on no more devices than
    stages (a spawned CPU run passes 0: its stages share the cores, replicas would only divide them further)."""
    if gpus <= stages:
        return [1] * stages
    with mp.get_context("spawn").Pool(1) as pool:
        layout = pool.apply(plan_replicas, (dataclasses.replace(cfg, device=device, replicas=1), shape.in_channels,
                                            shape.num_classes, shape.input_size, gpus))
    if layout is None:
        raise ConfigError(f"replicas auto: no replica of some module fits one device's memory at batch {cfg.batch_size}"
                          " (see launch.py plan --gpus); lower the batch or change the split")
    return layout.counts


def checked_link(kind: LinkKind, producer: str, consumer: str, checked: dict[tuple[str, str], bool]) -> LinkKind:
    """`kind`, unless it is CUDA IPC and the start-up check finds it broken between the two devices (then
    shared memory, with a warning: both ends are on this host)."""
    if kind is not LinkKind.CUDA_IPC:
        return kind
    if (producer, consumer) not in checked:
        error = cuda_ipc_error(producer, consumer)
        if error is not None:
            print(f"warning: CUDA IPC from {producer} to {consumer} does not work here ({error}); "
                  "those stages pass tensors through host shared memory instead", file=sys.stderr, flush=True)
        checked[(producer, consumer)] = error is None
    return kind if checked[(producer, consumer)] else LinkKind.SHARED_MEMORY


def stage_threads(cfg: Config, processes: int, local_processes: int | None = None) -> int:
    """Torch threads per stage process: the config's, or the host's cores shared among the processes on it."""
    if cfg.threads:
        return cfg.threads
    return max(1, (os.cpu_count() or 1) // (local_processes or processes))


def _describe_exit(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _describe_end(code: int | None, reported_error: bool) -> str:
    if code is None:  # still alive END_WAIT_S after its error
        return "failed"
    return _describe_exit(code) if code or reported_error else "stopped early"


def _await_end(coordinator: Coordinator, k: int, p: mp.Process) -> None:
    """Stage k reported an error or exited: wait (up to END_WAIT_S) for its exit and for the record it sent before.

    A stage sends its last record before it exits (`done` before exit code 0, its error before
    exit code 1, none when a signal kills it), yet the launcher may see either first.
    """
    deadline = time.monotonic() + END_WAIT_S
    p.join(timeout=END_WAIT_S)
    while (p.exitcode is not None and p.exitcode >= 0 and k not in coordinator.done and k not in coordinator.errors
           and time.monotonic() < deadline):
        coordinator.poll(100)


def _failed(coordinator: Coordinator, processes: list[mp.Process]) -> int | None:
    """The process to blame, if any failed: one killed by a signal, before one that reported an error, before one
    that only lost a neighbour (PeerLost).

    A replica killed in the middle of a collective makes the collective fail in its stage's other
    replicas within moments, and a stage that ends closes its links, which its neighbours notice at
    once: those report errors, but the cause is the killed or failing one. So once anything failed,
    the launcher looks again after CAUSE_WAIT_S before it names a process.
    """
    def failed() -> list[int]:
        return [k for k, p in enumerate(processes)
                if k in coordinator.errors or (p.exitcode is not None and k not in coordinator.done)]

    if not failed():
        return None
    deadline = time.monotonic() + CAUSE_WAIT_S
    while time.monotonic() < deadline:
        coordinator.poll(100)
    blamed = failed()  # a process that had finished may have had its `done` on the way: not failed after all
    def lost_a_peer(k: int) -> bool:
        return coordinator.errors.get(k, "").startswith(f"{PeerLost.__name__}:")

    return min(blamed, key=lambda k: (not (processes[k].exitcode or 0) < 0, lost_a_peer(k), k)) if blamed else None


def _stop(processes: list[mp.Process]) -> None:
    """Terminate every stage still alive, then kill what has not exited within the grace period."""
    processes = [p for p in processes if p.pid is not None]  # a failed start leaves the later ones unstarted
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + STOP_GRACE_S
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()


def run_spawned(cfg: Config, stages: int, shape: DataShape, resume: Checkpoint | None = None) -> dict[str, Any]:
    """Spawn the stage processes (one per replica of each of the K stages) linked by sockets in a folder only this
    user can open, coordinate them, and stop all on any failure."""
    remove_stale_ipc_dirs(Path(tempfile.gettempdir()))
    remove_segments()  # shared memory of stages killed before their first credit, in a run nobody cleaned up
    tmp = _private_folder()
    ctx = zmq.Context()
    processes: list[mp.Process] = []
    coordinator: Coordinator | None = None
    try:  # from here on every exit path, an error before training included, removes tmp and closes the sockets
        start_step = resume.step if resume is not None else 0
        counts = replica_counts(cfg.replicas, stages)
        check_batch(cfg.batch_size, counts)
        everyone = workers(counts)
        index = {(w.stage, w.replica): i for i, w in enumerate(everyone)}
        coordinator = Coordinator(cfg, stages, shape.steps_per_epoch, ctx, f"ipc://{tmp}/report", start_step,
                                  counts=counts)
        devices = spawned_devices(cfg, len(everyone))
        threads = stage_threads(cfg, len(everyone))

        # Stages take this process's environment (StageSpec.environment): a GPU's index names the same GPU in each.
        seen = tuple(f"cuda:{i}" for i in range(visible_gpus(cfg)))
        ends = [LinkEnd(host_id(), device if device in seen else None, seen) for device in devices]
        checked: dict[tuple[str, str], bool] = {}

        def out_link(i: int, j: int) -> LinkKind:  # the kind of the link from process i to process j
            return checked_link(link_kind(cfg.transport, ends[i], ends[j]), devices[i], devices[j], checked)

        def link(k: int, receiver: int, sender: int) -> str:  # the input of replica `receiver` of stage k from `sender`
            kind = out_link(index[k - 1, sender], index[k, receiver])
            return link_endpoint(kind, tmp, f"link{k}.{receiver}.{sender}")

        specs = []
        for i, w in enumerate(everyone):
            k, r = w.stage, w.replica
            sources = senders_of(r, counts[k], counts[k - 1]) if k else []
            targets = receivers_of(r, counts[k], counts[k + 1]) if k + 1 < stages else []
            specs.append(StageSpec(
                k, stages, cfg.to_dict(), [link(k, r, s) for s in sources], [link(k + 1, t, r) for t in targets],
                coordinator.endpoint, devices[i], threads, shape, [out_link(i, index[k + 1, t]) for t in targets],
                _resume_path(resume), start_step, launcher_pid=os.getpid(), environment=dict(os.environ),
                replica=r, counts=counts, group_devices=[devices[index[k, q]] for q in range(counts[k])],
                group_store=f"{tmp}/group{k}" if counts[k] > 1 else None))
        processes = [forkserver().Process(target=stage_main, args=(spec,), name=spec.name.replace(" ", ""))
                     for spec in specs]
        start = time.time()
        for p in processes:
            p.start()
        while not coordinator.finished:
            coordinator.poll(100)
            silent = coordinator.silent_stage(cfg.heartbeat_timeout)
            if silent is not None:
                raise coordinator.failure(silent, f"sent no heartbeat for {cfg.heartbeat_timeout:.0f} s (hung)")
            k = _failed(coordinator, processes)
            if k is not None:
                p = processes[k]
                _await_end(coordinator, k, p)
                if k not in coordinator.done:  # else it had finished and its `done` was still on the way
                    raise coordinator.failure(k, _describe_end(p.exitcode, k in coordinator.errors))
        for p in processes:
            p.join(timeout=60)
        return coordinator.finish(time.time() - start)
    finally:
        with interrupts_deferred():  # a second Ctrl-C, SIGTERM or SIGHUP waits for the cleanup (a few seconds at most)
            _stop(processes)
            remove_segments()  # a stage killed with SIGKILL cannot unlink its own
            if coordinator is not None:
                coordinator.close()
            ctx.destroy(linger=0)  # closes whatever is still open: cleanup after Ctrl-C or a failure cannot block
            shutil.rmtree(tmp, ignore_errors=True)


def _private_folder() -> str:
    """A new folder for this process's sockets, only this user can open (mkdtemp: 0700), naming its maker (pid and
    host name) so that `remove_stale_ipc_dirs` can tell when it is stale."""
    folder = tempfile.mkdtemp(prefix=IPC_PREFIX)
    (Path(folder) / LAUNCHER_PID).write_text(f"{os.getpid()} {socket.gethostname()}")
    return folder


def folder_maker(folder: Path) -> tuple[int, str | None] | None:
    """The pid and host name of the process that made an ipc folder (host None: a folder of an older version), or
    None if the folder does not say (not one of ours, or still being made)."""
    try:
        pid, *host = (folder / LAUNCHER_PID).read_text().split()
        return int(pid), host[0] if host else None
    except (OSError, ValueError):
        return None


def remove_stale_ipc_dirs(root: Path) -> list[Path]:
    """Delete the ipc folders of launchers (or torchrun ranks) that are gone: one killed with SIGKILL cannot remove
    its own.

    A folder counts as stale only if it names its maker (LAUNCHER_PID), was made on this host, and no process has
    that pid; anything else under the prefix (a live run, a folder still being made, one of another host sharing
    this temp dir) is left alone.
    """
    removed = []
    for folder in root.glob(f"{IPC_PREFIX}*"):
        maker = folder_maker(folder)
        if maker is None or maker[1] not in (None, socket.gethostname()):
            continue
        if not process_alive(maker[0]):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _resume_path(resume: Checkpoint | None) -> str | None:
    return str(resume.path) if resume is not None else None


@contextlib.contextmanager
def _signals_default() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP (unless ignored: nohup) end the process at once inside the block: torch's
    rendezvous waits for the other ranks in C++, where Python's handlers never run, so a rank whose peers never come
    would ignore them (nothing to clean up yet: no stage, socket or segment exists; the kernel drops the run
    directory's lock)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
             if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_torchrun(cfg: Config, stages: int, data: Data, resume: Checkpoint | None = None) -> dict[str, Any] | None:
    """This torchrun process's stage (or replica of one) on `data` (loaded by launch.py: stage 1's ranks draw from it,
    the others need its shape); rank 0 also coordinates and returns the result (others return None). Ranks map to
    (stage, replica) in routes.workers order, stage by stage: torchrun numbers the ranks of a node consecutively, so a
    stage's replicas share a node (and its fast links) where the counts allow."""
    import torch.distributed as dist

    with _signals_default():
        init_process_group("gloo")  # the default timeout: ranks may arrive minutes apart (data, split: auto)
    made: list[ReplicaGroup] = []
    try:
        return _torchrun_rank(cfg, stages, data, resume, made)
    finally:  # every way out, a set-up error's too: a group left to interpreter exit can abort the process there
        for group in made:  # then destroy frees it, even while an error's traceback keeps the stage that used it
            group.release()
        dist.destroy_process_group()


def _torchrun_rank(cfg: Config, stages: int, data: Data, resume: Checkpoint | None,
                   made: list[ReplicaGroup]) -> dict[str, Any] | None:
    """run_torchrun's part while the default group is up: find this rank's stage and replica, join the links, run;
    the replica group it makes goes into `made` as soon as it exists, for run_torchrun to release."""
    import torch.distributed as dist

    shape = data_shape(data, cfg.batch_size)
    remove_segments()  # shared memory left by the stages of a run killed before their first credit
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    own = torchrun_world(os.environ)  # checked by launch.py before it came here
    local_rank, local_world = own.local_rank, own.local_size
    single_node = local_world == world
    host = "127.0.0.1" if single_node else os.environ.get("SGR_HOST", socket.gethostbyname(socket.gethostname()))
    visible = visible_gpus(cfg)
    device = stage_device(cfg.device, cfg.gpus, rank, visible, local_rank)
    # GPUs are named by UUID between ranks: each rank may see a different set, numbered from 0 (CUDA_VISIBLE_DEVICES)
    uuids = list(gpu_uuids()) if visible else []
    own_uuid = uuids[torch.device(device).index] if device.startswith("cuda") else None
    if rank == 0:  # the run's CURVE keys: only processes that got them from the store can join a tcp link
        store.set(SECURITY_STORE_KEY, new_run_keys().encode())
    keys = RunKeys.decode(store.get(SECURITY_STORE_KEY))
    if cfg.replicas == "auto":  # rank 0 plans (on its GPU), every rank takes its counts: timings differ by rank
        if rank == 0:
            try:
                store.set("sgr/replicas", json.dumps({"counts": auto_replicas(cfg, shape, stages, world, device)}))
            except Exception as err:  # the other ranks wait for the counts: tell them why there are none
                store.set("sgr/replicas", json.dumps({"error": f"replicas auto, planned on rank 0: {err}"}))
                raise
        store.wait(["sgr/replicas"], timedelta(hours=2))  # a big model's profiling pass takes minutes
        planned = json.loads(store.get("sgr/replicas"))
        if "error" in planned:
            raise ConfigError(planned["error"])
        cfg = dataclasses.replace(cfg, replicas=planned["counts"])
        if sum(cfg.replicas) != world:
            raise ConfigError(f"replicas auto: the planner's layout {cfg.replicas} uses {sum(cfg.replicas)} of the {world}"
                              f" processes torchrun started (every count divides batch_size {cfg.batch_size}); use "
                              f"--nproc-per-node {sum(cfg.replicas)} or give --replicas")
    counts = replica_counts(cfg.replicas, stages)
    check_batch(cfg.batch_size, counts)
    everyone = workers(counts)
    me = everyone[rank]  # launch.check_topology refused a world that is not sum(counts)
    k, r = me.stage, me.replica
    group = _replica_group(store, counts, rank, own_uuid, torch.device(device), cfg.peer_timeout)
    if group is not None:
        made.append(group)
    ctx = zmq.Context()
    authenticator = start_authenticator(ctx, keys)
    coordinator = None
    start_step = resume.step if resume is not None else 0
    if rank == 0:
        coordinator = Coordinator(cfg, stages, shape.steps_per_epoch, ctx, f"tcp://{host}:*", start_step, keys, counts)
        store.set("sgr/report", coordinator.endpoint)
    sources = senders_of(r, counts[k], counts[k - 1]) if k else []
    targets = receivers_of(r, counts[k], counts[k + 1]) if k + 1 < stages else []
    # where each process lives, published first, so that the consumer of a link binds where its kind says (a CUDA
    # IPC link that the producer's start-up check turns into shared memory keeps its zmq channel: it works the same)
    own_end = LinkEnd(host_id(), own_uuid, tuple(uuids))
    store.set(f"sgr/end/{rank}", json.dumps(dataclasses.asdict(own_end)))

    def end_of(stage: int, replica: int) -> LinkEnd:
        published = json.loads(store.get(f"sgr/end/{everyone.index(Worker(stage, replica))}").decode())
        return LinkEnd(published["host"], published["gpu"], tuple(published["visible"]))

    remove_stale_ipc_dirs(Path(tempfile.gettempdir()))
    folder = _private_folder()  # this rank's Unix sockets (shared-memory input links)
    worker, spec, watcher, watching = None, None, None, threading.Event()
    try:
        in_endpoints = [link_endpoint(link_kind(cfg.transport, end_of(k - 1, s), own_end), folder, f"link{k}.{r}.{s}",
                                      host) for s in sources]
        spec = StageSpec(k, stages, cfg.to_dict(), in_endpoints, [], None, device,
                         stage_threads(cfg, world, local_world), shape, resume=_resume_path(resume),
                         start_step=start_step, keys=keys, replica=r, counts=counts)
        worker = StageWorker(spec, ctx, group, data if k == 0 else None)
        for source, endpoint in zip(sources, worker.in_endpoints):
            store.set(f"sgr/in/{k}/{r}/{source}", endpoint)
        out_endpoints, out_links = [], []
        for target in targets:
            out_endpoints.append(store.get(f"sgr/in/{k + 1}/{target}/{r}").decode())
            consumer = end_of(k + 1, target)
            kind = link_kind(cfg.transport, own_end, consumer)
            # the check's consumer process runs here: on the next stage's GPU if this rank sees it, else on our own
            check_on = f"cuda:{uuids.index(consumer.gpu)}" if consumer.gpu in uuids else device
            out_links.append(checked_link(kind, device, check_on, {}))
        worker.connect(out_endpoints, store.get("sgr/report").decode(), out_links)
        if coordinator is not None:
            watching.set()
            watcher = threading.Thread(target=_coordinate, args=(coordinator, cfg.heartbeat_timeout, watching, folder),
                                       daemon=True)
            watcher.start()
        start = time.time()
        worker.run()
        if watcher is not None:
            watcher.join()
            return coordinator.finish(time.time() - start)
        return None
    except Exception as err:  # as a spawned stage does (stage_main): report it; one line if the line says all
        # this rank is ending with its error, and torchrun SIGTERMs every rank as soon as one ends: a Terminated
        # raised during the cleanup below would replace the error's line (torchrun SIGKILLs a rank after 30 s)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
        if spec is None:
            raise
        line = report_error(err, worker, spec, ctx)
        if not isinstance(err, SAID_IN_ONE_LINE):
            raise
        raise StageFailed(f"{spec.name}: {line}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # first: it cannot fail (the sockets' names go with it)
        watching.clear()
        if watcher is not None:  # stopped before its socket closes under it
            watcher.join(timeout=5)
        if worker is not None:
            worker.close()
        if coordinator is not None:
            coordinator.close()
        if authenticator is not None:
            authenticator.stop()
        ctx.term()


def _replica_group(store: Any, counts: list[int], rank: int, own_uuid: str | None, device: torch.device,
                   timeout_s: float) -> ReplicaGroup | None:
    """Under torchrun: every stage's replica group (each rank takes part in making every group, in stage order, as
    torch.distributed requires), and this rank's own, if its stage has several replicas."""
    import torch.distributed as dist

    store.set(f"sgr/gpu/{rank}", own_uuid or "")
    everyone = workers(counts)
    mine = None
    for k, count in enumerate(counts):
        ranks = [i for i, w in enumerate(everyone) if w.stage == k]
        if count == 1:
            continue
        gpus = [store.get(f"sgr/gpu/{i}").decode() or None for i in ranks]
        made = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s), backend=group_backend(gpus))
        if rank in ranks:
            mine = ReplicaGroup(made, count, ranks.index(rank), device)
    return mine


def _coordinate(coordinator: Coordinator, heartbeat_timeout: float, watching: threading.Event, folder: Path) -> None:
    """Rank 0's coordinator loop under torchrun, while `watching` is set: collect records; report a stage's error as
    soon as it arrives.

    A failed stage exits by itself and torchrun stops the other ranks; a hung one cannot, so
    rank 0 exits non-zero (removing its `folder` first) and torchrun tears the run down. A hung
    rank on this host is killed first: torchrun's SIGTERM cannot stop a frozen process, and it
    would wait 30 s before its SIGKILL.
    """
    reported: set[int] = set()
    while not coordinator.finished and watching.is_set():
        coordinator.poll(100)
        for stage in set(coordinator.errors) - reported:
            print(f"error: {coordinator.failure(stage, 'failed')}", file=sys.stderr, flush=True)
            reported.add(stage)
        silent = coordinator.silent_stage(heartbeat_timeout)
        if silent is not None:
            print(f"error: {coordinator.failure(silent, f'sent no heartbeat for {heartbeat_timeout:.0f} s (hung)')}",
                  file=sys.stderr, flush=True)
            where = coordinator.where.get(silent)  # (host, pid) from its ready, which a beat (another socket) may pass
            if where is not None and where[0] == host_id():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(where[1], signal.SIGKILL)
                remove_segments(where[1])
            coordinator.save_partial_trace()  # os._exit skips the cleanup that would write it
            shutil.rmtree(folder, ignore_errors=True)
            os._exit(1)
