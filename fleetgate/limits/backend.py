"""The counter store behind admission: one interface, implementations chosen by name.

    create("memory") | create("redis", url=..., fail_open=...)      # see registry()

A backend decides one request against every counter in its :class:`~fleetgate.limits.spec.Checks`
at once (rpm and tpm buckets, concurrency counters, quotas) and either takes from all of them or
from none, then returns a :class:`Grant`; or it raises the refusal (429 ``rate_limit_exceeded``,
429 ``insufficient_quota``, 503 ``limits_unavailable``).

``admit`` returns a :class:`Grant` directly when the backend can decide without waiting (memory:
synchronous, O(checks), no task per request) or an awaitable of one (Redis: one round trip). Use
:func:`admit`, which also applies the caps and computes the cost, and await the result only when
it is awaitable.

``Grant.settle(prompt_tokens, completion_tokens)`` must be called once when the request ends,
however it ends (success, error, client gone): it settles tpm and quotas to the real usage and
releases the concurrency slots. A second call does nothing. It never blocks and never raises.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mypy_extensions import mypyc_attr

from fleetgate.errors import GatewayError, InvalidRequest, RateLimited
from fleetgate.limits import quotas
from fleetgate.limits.buckets import DEFAULT_MAX_TOKENS, admission_cost
from fleetgate.limits.headers import (
    RateView,
    RawHeaders,
    head_pairs,
    most_restrictive,
    rate_headers,
    retry_after,
)
from fleetgate.limits.spec import Checks, Quota, Subject, check_caps

Failure = Literal["", "rpm", "tpm", "concurrency", "quota"]


@mypyc_attr(allow_interpreted_subclasses=True)  # (Redis's, in the compiled build)
class Grant:
    """An admitted request's claim on the counters; settled exactly once.

    ``head`` holds the rate-limit headers for the response as header lines, built once (the
    request path adds them as they are); ``raw_headers`` and ``headers`` are the same as
    ``(name, value)`` pairs and as a dict of text.
    """

    __slots__ = ("head", "cost", "_settled")

    def __init__(self, head: bytes, cost: int) -> None:
        self.head = head
        self.cost = cost
        self._settled = False

    @property
    def raw_headers(self) -> RawHeaders:
        return head_pairs(self.head)

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self.raw_headers}

    def settle(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self._settled:
            return
        self._settled = True
        self._settle(max(0, prompt_tokens) + max(0, completion_tokens))

    def _settle(self, actual: int) -> None:
        return None

    @property
    def settled(self) -> bool:
        return self._settled


NO_LIMITS = Grant(b"", 0)
"""What a request with no counters gets (also what fail-open grants): settling it does nothing."""


@dataclass(slots=True)
class Outcome:
    """A backend's decision, before it becomes a Grant or an error (shared by every backend)."""

    failed: Failure
    index: int  # into checks.limits (rpm/tpm/concurrency) or checks.quotas (quota)
    wait_s: float
    requests: list[RateView]
    tokens: list[RateView]
    quota_used: int = 0

    def headers(self) -> dict[str, str]:
        return rate_headers(most_restrictive(self.requests), most_restrictive(self.tokens))


def refusal(outcome: Outcome, checks: Checks, cost: int, now_wall: float) -> GatewayError:
    """The error for a failed outcome, with the rate headers (and Retry-After)."""
    hdrs = outcome.headers()
    if outcome.failed == "quota":
        subject, quota = checks.quotas[outcome.index]
        err = quotas.exceeded(subject, quota, outcome.quota_used, cost, now_wall)
        err.headers.update(hdrs)
        return err
    subject, lim = checks.limits[outcome.index]
    if outcome.failed == "concurrency":
        msg = (
            f"Too many concurrent requests for {subject}: the limit is {lim.max_concurrent}. "
            "Retry when one of them has finished."
        )
    elif outcome.failed == "rpm":
        msg = f"Rate limit reached for {subject}: {lim.rpm} requests per minute."
    else:
        msg = (
            f"Rate limit reached for {subject}: {lim.tpm} tokens per minute; this request "
            f"counts {cost} tokens (its max_tokens, or the model's default, plus the prompt)."
        )
    hdrs.update(retry_after(max(outcome.wait_s, 0.001)))
    return RateLimited(f"{msg} Please retry after {math.ceil(outcome.wait_s) or 1} s.", headers=hdrs)


def too_large(checks: Checks, cost: int) -> None:
    """400 for a request that no amount of waiting admits: its cost is above a tpm limit."""
    for subject, lim in checks.limits:
        if lim.tpm is not None and cost > lim.tpm:
            raise InvalidRequest(
                f"This request counts {cost} tokens (its max_tokens or the model's default, times "
                f"n, plus the prompt at 4 bytes a token), above the limit of {lim.tpm} tokens per "
                f"minute set on {subject}. Lower max_tokens, n or the prompt.",
                param="max_tokens",
                code="request_above_tpm",
            )


@mypyc_attr(allow_interpreted_subclasses=True)
class Backend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def admit(self, checks: Checks, cost: int) -> Grant | Awaitable[Grant]:
        """Take from every counter in ``checks``, or from none and raise the refusal."""

    @abstractmethod
    async def seed_quota(self, subject: Subject, quota: Quota, used: int, now_wall: float) -> None:
        """Start this period's counter of ``subject`` at ``used`` (summed from the usage records
        at start-up, off the request path), unless the counter already exists."""

    async def start(self) -> None:
        """Start what runs beside the data plane (connections, the settle sender)."""
        return None

    async def close(self) -> None:
        """Flush pending settles where possible and stop; idempotent."""
        return None


def admit(
    backend: Backend,
    checks: Checks,
    *,
    body_bytes: int,
    max_tokens: int | None,
    n: int = 1,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    generates: bool = True,
) -> Grant | Awaitable[Grant]:
    """Caps (400), then the cost, then the backend. Await the result only if it is awaitable."""
    if checks.capped:
        check_caps(checks, max_tokens, n)
    if not checks.counts:
        return NO_LIMITS
    cost = admission_cost(body_bytes, max_tokens, n, default_max_tokens, generates=generates)
    floor = checks.tpm_floor
    if floor is not None and cost > floor:
        too_large(checks, cost)
    return backend.admit(checks, cost)


async def resolve(granted: Grant | Awaitable[Grant]) -> Grant:
    """For callers that are async anyway: the Grant, awaiting only when needed."""
    if isinstance(granted, Grant):
        return granted
    return await granted


BackendFactory = Callable[..., Backend]


def registry() -> dict[str, BackendFactory]:
    """Backends by the name ``limits.backend`` takes. Redis is imported only when named."""

    def _redis(**kw: Any) -> Backend:
        from fleetgate.limits.redis_backend import RedisBackend

        return RedisBackend(**kw)

    from fleetgate.limits.memory import MemoryBackend

    return {"memory": MemoryBackend, "redis": _redis}


def create(name: str, **options: Any) -> Backend:
    try:
        factory = registry()[name]
    except KeyError:
        raise ValueError(f"unknown limits backend {name!r}; use 'memory' or 'redis'") from None
    return factory(**options)
