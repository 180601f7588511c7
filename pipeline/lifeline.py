"""How a run's processes start, how they end with the process they serve, and when Ctrl-C may stop them.

Stages and loader processes are forked from one server process that imported PRELOAD once: a
spawned process would import torch again (seconds, for each of K stages and each loader). They end
with their launcher or stage through `exit_with`: a parent-death signal (PR_SET_PDEATHSIG) does not
serve, since their parent is the server, and a forkserver lives as long as any process it forked.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.forkserver
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Iterator

UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, less its terminating zero)
# the deepest socket under the temp folder: multiprocessing's forkserver at TEMP/pymp-XXXXXXXX/listener-XXXXXXXX
# (the links' TEMP/sgr-XXXXXXXX/linkK.R.S are shorter), so the temp folder's own path may take the rest
MAX_TEMP_DIR = UNIX_PATH_MAX - len("/pymp-XXXXXXXX/listener-XXXXXXXX")
POLL_S = 1.0  # where pidfd_open is missing (not Linux >= 5.3): how often to look
# all that a stage or a loader process imports: the project's code with torch, and what torch and torchvision
# import on first use (torch._dynamo, 2-3 s, on building an optimizer; torchvision for its models and transforms);
# first, the module that makes the server ignore Ctrl-C while it imports the rest (workers: its package imports nothing)
PRELOAD = ["workers.quiet_server", "workers.stage", "torch._dynamo", "torchvision.transforms.v2.functional"]
_started_by: int | None = None  # the process that started a server with its own sys.path (a fork inherits this)
_made_temp_dir: str | None = None  # the temp folder that process made for the server's socket, if it made one
_deferring = 0  # how deep the main thread is in interrupts_deferred blocks (other threads' do not count)
_pending: list[BaseException] = []  # an interrupt that came inside one, raised where the outermost ends


def forkserver() -> mp.context.ForkServerContext:
    """The start method of stages and loader processes: forks of a server that imported PRELOAD once.

    The server runs no Python thread and never touches CUDA, so its forks may. One server per process
    that uses it: the launcher's for its stages, stage 1's own for its loaders. Forks inherit the
    environment the server started with (stages then apply the launcher's current one: StageSpec).
    """
    global _started_by, _made_temp_dir
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts
    if _started_by != os.getpid():
        # Python 3.11's server imports PRELOAD before it takes this process's sys.path (3.12 takes it first):
        # started with sys.path as its PYTHONPATH, it imports the code this process runs, not an installed copy.
        # Done once, before this process's own threads could read the environment while it changes.
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        inherited = _temp_dir()  # a fork of a server has its parent's (multiprocessing copies it to every child)
        try:
            multiprocessing.forkserver.ensure_running()  # its socket goes in the temp folder, made now if none
            _made_temp_dir = _temp_dir() if inherited is None else None
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        _started_by = os.getpid()
    return context


def restore_interrupts() -> None:
    """In a fork of the server: Ctrl-C raises KeyboardInterrupt again (the server ignores it: quiet_server)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def remove_multiprocessing_temp_dir() -> None:
    """Remove the folder multiprocessing made for this process's forkserver socket, if this process made it:
    multiprocessing removes it at a normal exit only, not after os._exit, and /tmp filled with them."""
    if _made_temp_dir is not None and _started_by == os.getpid():
        shutil.rmtree(_made_temp_dir, ignore_errors=True)


def _temp_dir() -> str | None:
    """multiprocessing's temp folder for this process (multiprocessing.util.get_temp_dir), None until one is made."""
    return mp.current_process()._config.get("tempdir")


def adopt_environment(environment: dict[str, str]) -> None:
    """Make this process's environment exactly `environment`: a fork of the server starts with the
    server's, which may be older than its launcher's (CUDA_VISIBLE_DEVICES changed since, say)."""
    os.environ.clear()
    os.environ.update(environment)


def exit_with(pid: int, _worker_id: int | None = None, *, its_temp_dir: bool = False) -> None:
    """From now on, SIGTERM this process as soon as process `pid` has ended (a daemon thread watches it); with
    `its_temp_dir`, first remove the multiprocessing temp folder inherited from `pid`, which a `pid` killed with
    SIGKILL left behind (its forkserver's socket; it has ended, so none of its own cleanup can still use it).

    Also a DataLoader `worker_init_fn` (as `functools.partial(exit_with, pid)`): the worker id is ignored.
    """
    threading.Thread(target=_watch, args=(pid, its_temp_dir), name=f"exit-with-{pid}", daemon=True).start()


def _watch(pid: int, its_temp_dir: bool) -> None:
    try:
        fd = os.pidfd_open(pid)
        select.select([fd], [], [])  # readable once the process has ended
    except ProcessLookupError:  # ended already
        pass
    except (AttributeError, OSError):
        while process_alive(pid):
            time.sleep(POLL_S)
    if its_temp_dir and (folder := _temp_dir()) is not None:
        shutil.rmtree(folder, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGTERM)


def temp_dir_error() -> str | None:
    """Why the temp folder cannot hold a run's Unix sockets (its path is too long), or None if it can."""
    folder = tempfile.gettempdir()
    length = len(os.fsencode(folder))
    if length <= MAX_TEMP_DIR:
        return None
    return (f"the temp folder {folder} has a {length}-byte path, and the run's Unix sockets in it need one of at most "
            f"{MAX_TEMP_DIR}; set TMPDIR to a shorter folder")


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (someone else's counts). A number no process can have (0, negative,
    beyond the kernel's range: read from a file anyone could write) is no live process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def raise_interrupt(error: BaseException) -> None:
    """A Ctrl-C, SIGTERM or SIGHUP handler's work: raise `error` now, or where the interrupts_deferred block ends."""
    if _deferring:
        _pending[:] = _pending or [error]  # the first one counts
        return
    raise error


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP (raise_interrupt) wait until the block ends. An exception a signal handler raises
    inside a lock or a queue that another thread shares (TensorBoard's writer) can leave that thread waiting for ever,
    and the run's cleanup with it. Only the main thread's blocks count: handlers run there, and an interrupt deferred
    into another thread (torchrun's coordinator thread writes metrics) would end that thread, not the run."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            error = _pending.pop()
            raise error
