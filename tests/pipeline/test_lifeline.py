"""exit_with: a process forked from a forkserver ends when the process it serves ends, SIGKILL included; Ctrl-C
waits for the end of an interrupts_deferred block."""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.lifeline import (adopt_environment, exit_with, forkserver, interrupts_deferred, process_alive,
                               raise_interrupt)

ROOT = Path(__file__).parents[2]


def _serve(pid: int) -> None:
    exit_with(pid)
    time.sleep(120)


def test_a_forkserver_child_ends_soon_after_the_process_it_watches_is_killed():
    watched = subprocess.Popen(["sleep", "120"])
    child = forkserver().Process(target=_serve, args=(watched.pid,))
    child.start()
    try:
        time.sleep(0.5)
        assert child.is_alive()
        watched.kill()
        child.join(timeout=10)
        assert child.exitcode == -15  # SIGTERM, from its own watcher thread
    finally:
        watched.kill()
        if child.is_alive():
            child.kill()


def test_watching_a_process_that_has_ended_ends_this_one_at_once():
    gone = subprocess.Popen(["true"])
    gone.wait()
    child = forkserver().Process(target=_serve, args=(gone.pid,))
    child.start()
    child.join(timeout=10)
    assert child.exitcode == -15 and not process_alive(gone.pid)


def test_the_forkserver_imports_the_code_of_this_process_not_an_installed_copy(tmp_path):
    """Run from a copy of the packages (another checkout, say): stages must run the copy's code."""
    for package in ("pipeline", "workers"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "origin.py").write_text("def report(queue):\n    import workers.stage\n    queue.put(workers.stage.__file__)\n")
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "import origin\nfrom pipeline.lifeline import forkserver\n"
              "if __name__ == '__main__':\n"
              "    context = forkserver(); queue = context.Queue()\n"
              "    child = context.Process(target=origin.report, args=(queue,)); child.start()\n"
              "    print(queue.get(timeout=120)); child.join()\n")
    (tmp_path / "main.py").write_text(script)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, str(tmp_path / "main.py"), str(tmp_path)], cwd=elsewhere,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(tmp_path / "workers" / "stage.py")


def _report_mark(queue, environment) -> None:
    if environment is not None:
        adopt_environment(environment)
    queue.put(os.environ.get("SGR_TEST_MARK"))


def test_a_fork_sees_the_servers_old_environment_until_it_adopts_the_current_one(monkeypatch):
    context = forkserver()  # running from here on (in a test session, often since an earlier test)
    monkeypatch.setenv("SGR_TEST_MARK", "set after the server started")
    queue = context.Queue()
    for environment in (None, dict(os.environ)):
        child = context.Process(target=_report_mark, args=(queue, environment))
        child.start()
        child.join(timeout=60)
    assert [queue.get(timeout=10), queue.get(timeout=10)] == [None, "set after the server started"]


def test_an_interrupt_inside_a_deferred_block_is_raised_where_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt, match="first"):
        with interrupts_deferred():
            with interrupts_deferred():
                raise_interrupt(KeyboardInterrupt("first"))
                raise_interrupt(KeyboardInterrupt("second"))  # a second signal adds nothing
                done.append("inner")
            done.append("outer")  # nested: only the outermost block's end raises
    assert done == ["inner", "outer"]
    with pytest.raises(KeyboardInterrupt, match="now"):
        raise_interrupt(KeyboardInterrupt("now"))  # outside any block: at once
    with interrupts_deferred():  # nothing pending any more
        pass


def test_another_threads_deferred_block_does_not_hold_back_the_main_threads_interrupt():
    inside, leave = threading.Event(), threading.Event()

    def write() -> None:  # as torchrun's coordinator thread writes metrics
        with interrupts_deferred():
            inside.set()
            leave.wait(10)

    writer = threading.Thread(target=write)
    writer.start()
    inside.wait(10)
    try:
        with pytest.raises(KeyboardInterrupt):
            raise_interrupt(KeyboardInterrupt())  # the main thread's handler: raised here, at once
    finally:
        leave.set()
        writer.join(10)


def test_ctrl_c_in_the_launcher_waits_for_the_metrics_line_it_is_writing(tmp_path):
    """launch.py's SIGINT handler defers to interrupts_deferred: a real signal inside JsonlLog.write."""
    script = ("import os, signal, sys\nsys.argv = ['launch.py']\nimport launch\n"
              "from pipeline.metrics import JsonlLog\n"
              "signal.signal(signal.SIGINT, launch._interrupt)\n"
              f"log = JsonlLog(__import__('pathlib').Path({str(tmp_path / 'm.jsonl')!r}))\n"
              "original, flushed = log.file.flush, []\n"
              "def flush():\n    os.kill(os.getpid(), signal.SIGINT)\n    original()\n    flushed.append(1)\n"
              "log.file.flush = flush\n"
              "try:\n    log.write({'step': 1})\n"
              "except KeyboardInterrupt:\n    print(f'interrupted after {len(flushed)}')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout == "interrupted after 1\n", proc.stderr  # not inside the flush: after the whole write
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("pid", [0, -1, 99_999_999_999, 2**64])
def test_a_pid_no_process_can_have_is_not_alive(pid):
    """Markers in /tmp and /dev/shm are anyone's to write: a wild number must not crash the sweep that reads them."""
    assert not process_alive(pid)


SERVER_SCRIPT = '''
import multiprocessing.forkserver, os, signal, sys, time
sys.path.insert(0, {root!r})
from pipeline.lifeline import forkserver, restore_interrupts, remove_multiprocessing_temp_dir


def interrupted() -> None:
    restore_interrupts()
    signal.raise_signal(signal.SIGINT)


if __name__ == "__main__":
    context = forkserver()
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    while "libtorch" not in open(f"/proc/{{server}}/maps").read():  # it is importing torch (PRELOAD)
        time.sleep(0.01)
    os.kill(server, signal.SIGINT)  # a Ctrl-C while it imports
    codes = []
    for target in (signal.raise_signal, interrupted):
        child = context.Process(target=target, args=(signal.SIGINT,) if target is signal.raise_signal else ())
        child.start()
        child.join()
        codes.append(child.exitcode)
    print(*codes)
    remove_multiprocessing_temp_dir()
    os._exit(0)  # as launch.py leaves after Ctrl-C: multiprocessing's own cleanup does not run
'''


def test_ctrl_c_while_the_forkserver_imports_is_ignored_and_its_forks_get_ctrl_c_back(tmp_path, own_temp):
    """The server ignores SIGINT while it imports torch (no traceback from its preload); a fork that calls
    restore_interrupts ends by KeyboardInterrupt (exit 1), one that does not ignores SIGINT (exit 0). The temp folder
    ends empty."""
    (tmp_path / "serve.py").write_text(SERVER_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, "serve.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(own_temp)})
    assert proc.stdout == "0 1\n", proc.stderr
    assert "KeyboardInterrupt" in proc.stderr and proc.stderr.count("Traceback") == 1  # the second fork's only
    assert not list(own_temp.glob("pymp-*"))
