"""Token buckets for rpm and tpm, and what one request costs: pure functions, the clock passed in.

A bucket's capacity is its per-minute value and it refills continuously at ``capacity / 60`` per
second, so a full bucket allows a burst of one minute's worth and then the steady rate. A request
takes 1 from each rpm bucket and its admission cost from each tpm bucket. When the response ends
the tpm take settles to the real usage: :func:`settle_level` refunds what was over-counted or
charges what was under-counted (a level may go below zero; the next requests then wait).

:func:`admission_cost` is ``n x max_tokens`` (or ``default_max_tokens`` when the request sets
neither ``max_tokens`` nor ``max_completion_tokens``) plus a prompt estimate of body bytes / 4.

The same arithmetic runs in Lua inside Redis (:mod:`fleetgate.limits.redis_backend`); the tests
hold both to the tables in ``tests/limits``.
"""

from __future__ import annotations

DEFAULT_MAX_TOKENS = 1024
BYTES_PER_TOKEN = 4


def admission_cost(
    body_bytes: int,
    max_tokens: int | None,
    n: int = 1,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    generates: bool = True,
) -> int:
    """Tokens a request is counted for at admission, before its real usage is known.

    ``generates`` is False for embeddings: they produce no completion tokens.
    """
    prompt = -(-max(0, body_bytes) // BYTES_PER_TOKEN)  # ceil: a 1-byte body is 1 token
    if not generates:
        return prompt
    per_choice = default_max_tokens if max_tokens is None else max_tokens
    return prompt + max(1, n) * max(0, per_choice)


def refill(level: float, updated: float, now: float, capacity: int) -> float:
    """The level at ``now`` of a bucket that was at ``level`` at ``updated``.

    A clock that went backwards refills nothing (never a negative refill).
    """
    if now <= updated:
        return min(level, float(capacity))
    return min(float(capacity), level + (now - updated) * capacity / 60.0)


def wait_s(level: float, need: float, capacity: int) -> float:
    """Seconds until a bucket at ``level`` holds ``need`` (0 if it already does)."""
    if level >= need:
        return 0.0
    return (need - level) * 60.0 / capacity


def until_full_s(level: float, capacity: int) -> float:
    """Seconds until the bucket is full again: OpenAI's ``x-ratelimit-reset-*`` value."""
    return max(0.0, (capacity - level) * 60.0 / capacity)


def settle_level(level: float, charged: int, actual: int, capacity: int) -> float:
    """The level after a request charged ``charged`` turned out to use ``actual``."""
    return min(float(capacity), level + (charged - actual))
