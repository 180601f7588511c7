import pytest

from pipeline.config import ConfigError
from workers.routes import (Worker, check_batch, linked, receivers_of, replica_counts, rows_to, senders_of, shard,
                            workers)


def test_replica_counts_from_one_count_or_a_list():
    assert replica_counts(1, 3) == [1, 1, 1]
    assert replica_counts(2, 2) == [2, 2]
    assert replica_counts([1, 2, 2], 3) == [1, 2, 2]
    with pytest.raises(ConfigError, match="replicas lists 2 values but the split has 3 stages"):
        replica_counts([1, 2], 3)
    with pytest.raises(ConfigError, match=">= 1 per stage"):
        replica_counts([1, 0], 2)


def test_batch_must_split_evenly_into_shards_of_two_rows():
    check_batch(12, [1, 2, 3])
    with pytest.raises(ConfigError, match="does not split evenly over 3 replicas"):
        check_batch(32, [1, 2, 3])
    with pytest.raises(ConfigError, match="shards of 1 row"):
        check_batch(4, [4])


def test_workers_are_numbered_stage_by_stage():
    assert workers([1, 2]) == [Worker(0, 0), Worker(1, 0), Worker(1, 1)]
    assert Worker(1, 1).name([1, 2]) == "stage 2 replica 2"
    assert Worker(0, 0).name([1, 2]) == "stage 1"


@pytest.mark.parametrize("rows", [1, 7, 12, 32, 1000])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_cover_the_batch_in_order(rows, count):
    bounds = [shard(rows, count, r) for r in range(count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


# (sender count, receiver count) -> the links, as (sender, receiver) pairs
LINKS = [
    (1, 1, [(0, 0)]),
    (2, 2, [(0, 0), (1, 1)]),  # equal counts: lane r -> r
    (1, 2, [(0, 0), (0, 1)]),
    (2, 1, [(0, 0), (1, 0)]),
    (2, 3, [(0, 0), (0, 1), (1, 1), (1, 2)]),  # the middle receiver takes a row range from two senders
    (3, 2, [(0, 0), (1, 0), (1, 1), (2, 1)]),
]


@pytest.mark.parametrize("n_send, n_recv, expected", LINKS)
def test_links_join_overlapping_shards(n_send, n_recv, expected):
    pairs = [(s, r) for s in range(n_send) for r in range(n_recv) if linked(s, n_send, r, n_recv)]
    assert pairs == expected
    assert all(receivers_of(s, n_send, n_recv) == [r for s2, r in expected if s2 == s] for s in range(n_send))
    assert all(senders_of(r, n_recv, n_send) == [s for s, r2 in expected if r2 == r] for r in range(n_recv))


@pytest.mark.parametrize("rows", [1, 5, 12, 1000])
@pytest.mark.parametrize("n_send, n_recv, _", LINKS)
def test_each_receiver_gets_exactly_its_shard_from_its_senders(rows, n_send, n_recv, _):
    for r in range(n_recv):
        got = []
        for s in senders_of(r, n_recv, n_send):
            start, end = rows_to(rows, s, n_send, r, n_recv)
            offset = shard(rows, n_send, s)[0]
            got.extend(range(offset + start, offset + end))
        assert got == list(range(*shard(rows, n_recv, r)))
