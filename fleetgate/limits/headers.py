"""The ``x-ratelimit-*`` headers and OpenAI's duration format: pure functions.

Every admitted request and every 429 carries, for requests and for tokens, the limit that is the
most restrictive of all that apply (the fewest remaining; among equals, the smallest limit):

    x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests
    x-ratelimit-limit-tokens,   x-ratelimit-remaining-tokens,   x-ratelimit-reset-tokens

A kind with no limit that applies is left out. ``reset`` is the time until that bucket is full
again, written as OpenAI writes it (Go's duration format): ``20ms``, ``1s``, ``1.5s``, ``6m0s``,
``1h0m0s``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from fleetgate.limits.buckets import until_full_s


@dataclass(frozen=True, slots=True)
class RateView:
    """One bucket as the client sees it, just after this request's take."""

    limit: int
    remaining: int
    reset_s: float

    @classmethod
    def of(cls, capacity: int, level: float) -> RateView:
        return cls(capacity, max(0, math.floor(level)), until_full_s(level, capacity))


def format_duration(seconds: float) -> str:
    """``0.02`` -> ``20ms``, ``1`` -> ``1s``, ``1.5`` -> ``1.5s``, ``360`` -> ``6m0s``.

    Rounded up to the millisecond, so a reset is never announced earlier than it happens.
    """
    ms = max(0, math.ceil(round(seconds * 1000, 6)))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, frac = divmod(rest, 1000)
    sec = f"{s}.{frac:03d}".rstrip("0") if frac else str(s)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


def most_restrictive(views: Iterable[RateView]) -> RateView | None:
    best: RateView | None = None
    for v in views:
        if best is None or (v.remaining, v.limit) < (best.remaining, best.limit):
            best = v
    return best


def rate_headers(requests: RateView | None, tokens: RateView | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for kind, v in (("requests", requests), ("tokens", tokens)):
        if v is None:
            continue
        out[f"x-ratelimit-limit-{kind}"] = str(v.limit)
        out[f"x-ratelimit-remaining-{kind}"] = str(v.remaining)
        out[f"x-ratelimit-reset-{kind}"] = format_duration(v.reset_s)
    return out


RawHeaders = list[tuple[bytes, bytes]]

_TEMPLATES = {
    kind: b"x-ratelimit-limit-%b: %%d\r\nx-ratelimit-remaining-%b: %%d\r\n"
          b"x-ratelimit-reset-%b: %%b\r\n" % (kind, kind, kind)
    for kind in (b"requests", b"tokens")
}


def _ceil_ms(ms: float) -> int:
    """``math.ceil(round(ms, 6))`` for ``ms > 0`` (format_duration's rounding), without
    ``round``'s decimal conversion unless ``ms`` is within 1e-6 above a whole number (anything
    further above rounds to more than it, so its ceiling is the next one)."""
    whole = int(ms)
    if ms - whole > 1e-6:
        return whole + 1
    return math.ceil(round(ms, 6))


def bucket_head(kind: bytes, capacity: int, level: float) -> bytes:
    """One bucket's three headers (``kind``: ``b"requests"`` or ``b"tokens"``) as header lines,
    one format per bucket: what :func:`rate_headers` writes for ``RateView.of(capacity, level)``,
    built on every admitted request without the intermediate objects."""
    remaining = math.floor(level) if level > 0 else 0
    # until_full_s and format_duration, inlined for the usual case (a reset under a second).
    seconds = (capacity - level) * 60.0 / capacity
    ms = _ceil_ms(seconds * 1000) if seconds > 0 else 0
    reset = b"%dms" % ms if 0 < ms < 1000 else format_duration(max(0.0, seconds)).encode()
    return _TEMPLATES[kind] % (capacity, remaining, reset)


_BOTH = (
    b"x-ratelimit-limit-requests: %d\r\nx-ratelimit-remaining-requests: %d\r\n"
    b"x-ratelimit-reset-requests: %dms\r\nx-ratelimit-limit-tokens: %d\r\n"
    b"x-ratelimit-remaining-tokens: %d\r\nx-ratelimit-reset-tokens: %dms\r\n"
)


def rate_head(r_cap: int | None, r_level: float, t_cap: int | None, t_level: float) -> bytes:
    """Both kinds' header lines (a kind whose capacity is None is left out): the same bytes as
    :func:`bucket_head` for each, in one format when both resets are under a second (every
    admitted request under a generous limit)."""
    if r_cap is not None and t_cap is not None:
        r_s = (r_cap - r_level) * 60.0 / r_cap
        t_s = (t_cap - t_level) * 60.0 / t_cap
        if 0 < r_s < 0.999 and 0 < t_s < 0.999:
            r_ms = _ceil_ms(r_s * 1000)
            t_ms = _ceil_ms(t_s * 1000)
            if r_ms and t_ms:  # a reset that rounds to 0 ms is written "0s", as bucket_head does
                return _BOTH % (
                    r_cap, math.floor(r_level) if r_level > 0 else 0, r_ms,
                    t_cap, math.floor(t_level) if t_level > 0 else 0, t_ms,
                )
    head = b"" if r_cap is None else bucket_head(b"requests", r_cap, r_level)
    return head if t_cap is None else head + bucket_head(b"tokens", t_cap, t_level)


def head_lines(headers: dict[str, str]) -> bytes:
    """Headers as header lines (``name: value\r\n`` each)."""
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")


def head_pairs(head: bytes) -> RawHeaders:
    """Header lines back as ``(name, value)`` pairs, for servers that take only those."""
    out: RawHeaders = []
    for line in head.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b": ")
            out.append((name, value))
    return out


def retry_after(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (at least 1) and ``retry-after-ms``, which the official
    client prefers when present."""
    ms = max(1, math.ceil(seconds * 1000))
    return {"retry-after": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(ms)}
