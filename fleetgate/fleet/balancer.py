"""Which ready replica takes a request: pure functions, no I/O, no clock, no randomness.

* :func:`least_outstanding`: the fewest requests in flight; ties go round-robin from ``start``.
* :func:`pick_affinity`: consistent hashing with bounded loads (Mirrokni et al., 2016). The
  key hashes to a point on a ring of virtual nodes; walking clockwise, the first replica whose
  load stays under ``ceil(load_factor * (total + 1) / n)`` takes it. The same key keeps going to
  the same replica while that replica isn't overloaded, and a replica joining or leaving moves
  only its share of the keys.

:func:`affinity_key` is what the request path hashes for ``prefix_affinity``.

Each costs O(replicas) (plus a bisect on the ring); the ring is built once per replica set by
:func:`build_ring` and cached by the caller.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

VNODES = 64


def _h(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def affinity_key(doc: dict[str, Any], prompt_bytes: int = 1024) -> bytes | None:
    """The part of a request that later requests of the same conversation (or app) share.

    Chat: the first two messages (typically the system prompt and the first user turn), which
    every later turn of that conversation repeats. Completions: the first ``prompt_bytes`` of
    the prompt. None when there's nothing to key on.
    """
    msgs = doc.get("messages")
    if isinstance(msgs, list) and msgs:
        return hashlib.blake2b(orjson.dumps(msgs[:2]), digest_size=16).digest()
    prompt = doc.get("prompt")
    if isinstance(prompt, str) and prompt:
        return hashlib.blake2b(prompt.encode()[:prompt_bytes], digest_size=16).digest()
    return None


def least_outstanding(loads: Sequence[int], start: int = 0) -> int:
    """Index of the least-loaded entry; among equals, the first at or after ``start``."""
    n = len(loads)
    if n == 0:
        raise ValueError("no candidates")
    best = start % n
    for k in range(1, n):
        i = (start + k) % n
        if loads[i] < loads[best]:
            best = i
    return best


@dataclass(frozen=True)
class Ring:
    ids: tuple[str, ...]
    points: tuple[int, ...]  # sorted hash points
    owners: tuple[int, ...]  # index into ids for each point


def build_ring(ids: Sequence[str], vnodes: int = VNODES) -> Ring:
    pts: list[tuple[int, int]] = []
    for i, rid in enumerate(ids):
        for v in range(vnodes):
            pts.append((_h(f"{rid}#{v}".encode()), i))
    pts.sort()
    return Ring(tuple(ids), tuple(p for p, _ in pts), tuple(o for _, o in pts))


def capacity(total: int, n: int, load_factor: float) -> int:
    """The most requests one replica may hold before affinity spills to the next one."""
    return max(1, math.ceil(load_factor * (total + 1) / max(n, 1)))


def pick_affinity(ring: Ring, loads: Sequence[int], key: bytes, load_factor: float) -> int:
    """Index (into ``ring.ids`` and ``loads``) of the replica for ``key``."""
    n = len(ring.ids)
    if n == 0:
        raise ValueError("no candidates")
    if len(loads) != n:
        raise ValueError("loads must match the ring's ids")
    cap = capacity(sum(loads), n, load_factor)
    start = bisect.bisect_left(ring.points, _h(key)) % len(ring.points)
    seen = 0
    tried = bytearray(n)
    # Every replica owns points, so one lap visits all of them; the loop is bounded by the lap.
    for k in range(len(ring.points)):
        i = ring.owners[(start + k) % len(ring.points)]
        if tried[i]:
            continue
        if loads[i] < cap:
            return i
        tried[i] = 1
        seen += 1
        if seen == n:
            break
    return least_outstanding(loads)  # every replica at capacity (can't happen with cap > avg)
