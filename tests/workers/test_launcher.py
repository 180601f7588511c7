import os
import socket
from types import SimpleNamespace

import pytest

from workers import launcher


def blame(monkeypatch, exitcodes: list[int | None], errors: dict[int, str]) -> int | None:
    """Which process `_failed` names, given each process's exit code (None: running) and the errors reported."""
    monkeypatch.setattr(launcher, "CAUSE_WAIT_S", 0.0)
    coordinator = SimpleNamespace(errors=errors, done=set(), poll=lambda timeout_ms: None)
    return launcher._failed(coordinator, [SimpleNamespace(exitcode=code) for code in exitcodes])


@pytest.mark.parametrize("exitcodes, errors, expected", [
    ([None, None, None], {}, None),  # nothing failed
    ([None, 1, 1], {1: "FloatingPointError: a NaN", 2: "ValueError: bug"}, 1),  # two causes: the first stage
    ([None, 1, -9], {1: "PeerLost: stage 3 has gone: it closed its end of the link"}, 2),  # a kill before an error
    # a stage that failed closes its links, its neighbours notice at once: they lost a peer, they are not the cause
    ([1, 1, None], {0: "PeerLost: stage 2 has gone: it closed its end of the link", 1: "DataError: bad image"}, 1),
    ([1, None, None], {0: "PeerLost: stage 2 acknowledged nothing for 120 s; it is dead or hung"}, 0),  # alone: named
    # replicas [1, 2, 2]: stage 3 replica 1 fails; stage 2 replica 1 loses it, and its fellow replica the collective
    ([None, 1, 1, 1, None], {1: "PeerLost: stage 3 replica 1 has gone: it closed its end of the link",
                             2: "PeerLost: a replica of this stage is gone or hung (Connection reset by peer)",
                             3: "DataError: bad image"}, 3),
])
def test_the_launcher_blames_the_cause_not_the_neighbours_that_lost_it(monkeypatch, exitcodes, errors, expected):
    assert blame(monkeypatch, exitcodes, errors) == expected


def test_only_the_ipc_folders_of_ended_processes_of_this_host_are_stale(tmp_path):
    dead = 999_999_999  # above pid_max: no such process
    markers = {"sgr-dead": f"{dead} {socket.gethostname()}",
               "sgr-old": f"{dead}",  # an older launcher wrote the pid only
               "sgr-other-host": f"{dead} another-node", "sgr-alive": f"{os.getpid()} {socket.gethostname()}",
               "sgr-unmarked": None, "sgr-garbled": "not a pid", "sgr-huge": f"{2**64} {socket.gethostname()}"}
    for name, marker in markers.items():
        (tmp_path / name).mkdir()
        if marker is not None:
            (tmp_path / name / launcher.LAUNCHER_PID).write_text(marker)
    assert sorted(p.name for p in launcher.remove_stale_ipc_dirs(tmp_path)) == ["sgr-dead", "sgr-huge", "sgr-old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sgr-alive", "sgr-garbled", "sgr-other-host", "sgr-unmarked"]
    assert launcher.folder_maker(tmp_path / "sgr-alive") == (os.getpid(), socket.gethostname())
