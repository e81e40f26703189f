"""The replica lifecycle: one transition table, one setter that enforces it."""

from __future__ import annotations

import pytest

from fleetgate.fleet.replica import TRANSITIONS, IllegalTransition, Replica, State

P, S, R, D, X, F = (
    State.PENDING,
    State.STARTING,
    State.READY,
    State.DRAINING,
    State.STOPPED,
    State.FAILED,
)
LEGAL = {
    (P, P),
    (P, S),
    (P, X),
    (P, F),
    (S, R),
    (S, P),
    (S, X),
    (S, F),
    (R, D),
    (R, P),
    (R, S),
    (R, X),
    (R, F),
    (D, X),
    (D, F),
}


def test_table_is_exactly_the_documented_one() -> None:
    assert {(a, b) for a, bs in TRANSITIONS.items() for b in bs} == LEGAL
    assert set(TRANSITIONS) == set(State)


def test_failed_reachable_from_every_live_state() -> None:
    for s in State:
        if s not in (X, F):
            assert F in TRANSITIONS[s]


def _at(path: list[State]) -> Replica:
    r = Replica("m-1", "m")
    for s in path:
        r._set_state(s, "test")
    return r


PATHS = {P: [], S: [S], R: [S, R], D: [S, R, D], X: [X], F: [F]}


@pytest.mark.parametrize("src", list(State))
@pytest.mark.parametrize("dst", list(State))
def test_every_move(src: State, dst: State) -> None:
    r = _at(PATHS[src])
    if (src, dst) in LEGAL:
        r._set_state(dst, "why")
        assert r.state is dst and r.reason == "why"
    else:
        with pytest.raises(IllegalTransition):
            r._set_state(dst, "why")
        assert r.state is src


def test_events_are_recorded_bounded_and_reported() -> None:
    seen: list[tuple[State, State]] = []
    r = Replica("m-1", "m", listener=lambda rep, old, new: seen.append((old, new)))
    for _ in range(40):
        r._set_state(S, "launched")
        r._set_state(P, "crashed")
    assert seen[:2] == [(P, S), (S, P)]
    assert len(r.history) == 32
    assert r.history[-1].state is P and r.history[-1].reason == "crashed"
    assert r.history[-1].as_dict()["state"] == "pending"


def test_routable_only_when_ready_and_not_suspect() -> None:
    r = _at([S])
    assert not r.routable
    r._set_state(R, "ok")
    assert r.routable
    r.mark_suspect()
    assert not r.routable and r.wake.is_set()
    r.clear_suspect()
    assert r.routable


def test_request_stop_is_idempotent_and_leaves_the_count() -> None:
    r = _at([S, R])
    assert r.active
    r.request_stop("scale down")
    r.request_stop("other")
    assert r.stop_reason == "scale down" and not r.active
