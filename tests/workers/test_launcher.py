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
])
def test_the_launcher_blames_the_cause_not_the_neighbours_that_lost_it(monkeypatch, exitcodes, errors, expected):
    assert blame(monkeypatch, exitcodes, errors) == expected
