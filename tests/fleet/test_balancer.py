"""Replica choice, as tables of cases (pure)."""

from __future__ import annotations

from collections import Counter

import pytest

from fleetgate.fleet.balancer import (
    affinity_key,
    build_ring,
    capacity,
    least_outstanding,
    pick_affinity,
)

LEAST = [
    ("single", [3], 0, 0),
    ("fewest wins", [3, 1, 2], 0, 1),
    ("tie goes to start", [1, 1, 1], 1, 1),
    ("tie wraps", [1, 1, 1], 5, 2),
    ("fewest beats start", [0, 2, 2], 1, 0),
    ("first fewest after start", [2, 0, 0], 2, 2),
]


@pytest.mark.parametrize(("name", "loads", "start", "want"), LEAST, ids=[c[0] for c in LEAST])
def test_least_outstanding(name: str, loads: list[int], start: int, want: int) -> None:
    assert least_outstanding(loads, start) == want


def test_least_outstanding_spreads_ties_round_robin() -> None:
    picks = [least_outstanding([0, 0, 0], s) for s in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]


def test_least_outstanding_empty() -> None:
    with pytest.raises(ValueError):
        least_outstanding([])


CAPACITY = [
    # (total in flight, replicas, load factor, cap)
    (0, 1, 1.25, 2),
    (0, 4, 1.25, 1),
    (7, 4, 1.25, 3),
    (99, 4, 1.25, 32),
    (8, 2, 1.0, 5),
]


@pytest.mark.parametrize(("total", "n", "c", "want"), CAPACITY)
def test_capacity(total: int, n: int, c: float, want: int) -> None:
    assert capacity(total, n, c) == want


IDS = ["m-a", "m-b", "m-c", "m-d"]


def test_same_key_same_replica() -> None:
    ring = build_ring(IDS)
    for k in range(50):
        key = f"conversation-{k}".encode()
        first = pick_affinity(ring, [0, 0, 0, 0], key, 1.25)
        assert all(pick_affinity(ring, [0, 0, 0, 0], key, 1.25) == first for _ in range(3))


def test_keys_spread_over_replicas() -> None:
    ring = build_ring(IDS)
    hits = Counter(pick_affinity(ring, [0] * 4, f"k{k}".encode(), 1.25) for k in range(2000))
    assert set(hits) == {0, 1, 2, 3}
    assert min(hits.values()) > 2000 / 4 * 0.6


def test_overloaded_owner_spills_to_next() -> None:
    ring = build_ring(IDS)
    key = b"hot prefix"
    owner = pick_affinity(ring, [0] * 4, key, 1.25)
    loads = [0] * 4
    loads[owner] = 10  # cap = ceil(1.25 * 11 / 4) = 4
    other = pick_affinity(ring, loads, key, 1.25)
    assert other != owner
    assert pick_affinity(ring, loads, key, 1.25) == other  # the spill is stable too


def test_bounded_loads_hold_under_one_hot_key() -> None:
    """Every request with the same key, none finishing: no replica exceeds the bound."""
    ring = build_ring(IDS)
    loads = [0] * 4
    for _ in range(100):
        i = pick_affinity(ring, loads, b"same", 1.25)
        assert loads[i] < capacity(sum(loads), 4, 1.25)
        loads[i] += 1
    assert max(loads) <= capacity(99, 4, 1.25)


def test_replica_leaving_moves_only_its_keys() -> None:
    full = build_ring(IDS)
    less = build_ring([i for i in IDS if i != "m-c"])
    moved = 0
    for k in range(1000):
        key = f"k{k}".encode()
        before = full.ids[pick_affinity(full, [0] * 4, key, 1.25)]
        after = less.ids[pick_affinity(less, [0] * 3, key, 1.25)]
        if before != "m-c":
            assert after == before
        else:
            moved += 1
    assert 0 < moved < 500


def test_affinity_requires_matching_loads() -> None:
    with pytest.raises(ValueError):
        pick_affinity(build_ring(IDS), [0, 0], b"k", 1.25)


SYS = {"role": "system", "content": "You are terse."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "4"}
U2 = {"role": "user", "content": "And 3+3?"}


def test_affinity_key_follows_a_conversation() -> None:
    turn1 = affinity_key({"messages": [SYS, U1]})
    turn2 = affinity_key({"messages": [SYS, U1, A1, U2]})
    assert turn1 is not None and turn1 == turn2
    assert affinity_key({"messages": [SYS, U2]}) != turn1
    assert affinity_key({"prompt": "x" * 2000}) == affinity_key({"prompt": "x" * 1024 + "y"})
    assert affinity_key({"prompt": ["tokens"]}) is None
    assert affinity_key({"messages": []}) is None
