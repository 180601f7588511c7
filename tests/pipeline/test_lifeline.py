"""exit_with: a process forked from a forkserver ends when the process it serves ends, SIGKILL included."""
import subprocess
import time

from pipeline.lifeline import exit_with, forkserver, process_alive


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
