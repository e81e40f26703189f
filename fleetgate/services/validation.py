"""Checks on what callers send: names, roles, model patterns, weights, durations, limits,
quotas and network allow-lists.

Each raises :class:`~fleetgate.errors.InvalidRequest` naming the field (``param``).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from enum import Enum

from fleetgate.auth.networks import parse_networks
from fleetgate.auth.principals import ROLES
from fleetgate.errors import InvalidRequest
from fleetgate.limits.spec import PERIODS

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}$")
MAX_PATTERNS = 200
MAX_PATTERN_LEN = 200
MAX_WEIGHT = 1e6
MAX_OVERLAP = dt.timedelta(days=30)
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrent", "max_tokens", "max_n")
MAX_LIMIT = 2**53  # JSON-safe, and far past anything a GPU serves
MAX_QUOTA = 2**62


class Keep(Enum):
    """"Leave this as it is", in updates where ``None`` is itself a value."""

    KEEP = 0


KEEP = Keep.KEEP


def name(value: object, param: str = "name") -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidRequest(
            f"{param} must be 1 to 200 letters, digits or . _ @ + -, starting with a letter or "
            "digit",
            param=param,
        )
    return value


def role(value: object) -> str:
    if value not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", param="role")
    return str(value)


def patterns(value: object, param: str = "models") -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidRequest(f"{param} must be a list of model names or globs", param=param)
    if len(value) > MAX_PATTERNS:
        raise InvalidRequest(f"{param}: at most {MAX_PATTERNS} patterns", param=param)
    out = []
    for p in value:
        if (
            not isinstance(p, str) or not p.strip() or len(p) > MAX_PATTERN_LEN
            or any(not c.isprintable() for c in p) or "," in p
        ):
            raise InvalidRequest(
                f"{param}: every pattern must be printable text of 1 to {MAX_PATTERN_LEN} "
                "characters without commas",
                param=param,
            )
        out.append(p.strip())
    return tuple(dict.fromkeys(out))  # drop repeats, keep order


def weight(value: object) -> float:
    if (
        isinstance(value, bool) or not isinstance(value, int | float)
        or not math.isfinite(value) or not 0 < value <= MAX_WEIGHT
    ):
        raise InvalidRequest(f"weight must be a number above 0 and at most {MAX_WEIGHT:g}",
                             param="weight")
    return float(value)


def overlap(value: dt.timedelta) -> dt.timedelta:
    if value < dt.timedelta(0) or value > MAX_OVERLAP:
        raise InvalidRequest("overlap must be between 0 and 30 days", param="overlap")
    return value


def _count(value: object, param: str, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise InvalidRequest(f"{param} must be a whole number from 0 to {most} (0 removes it)",
                             param=param)
    return value


def limits(value: object, param: str = "limits") -> dict[str, int]:
    """Limit changes (``{"rpm": 60, "tpm": 0}``): each a whole number, ``0`` or ``None``
    meaning "remove it". Returns the changes with ``None`` written as ``0``."""
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{param} must be an object with {', '.join(LIMIT_FIELDS)}",
                             param=param)
    out = {}
    for k, v in value.items():
        if k not in LIMIT_FIELDS:
            raise InvalidRequest(f"{param}: unknown limit {str(k)[:40]!r}; known: "
                                 f"{', '.join(LIMIT_FIELDS)}", param=param)
        out[k] = 0 if v is None else _count(v, f"{param}.{k}", MAX_LIMIT)
    return out


def merged_limits(current: Mapping[str, int] | None, changes: Mapping[str, int]) -> dict[str, int]:
    """``current`` with ``changes`` applied (``0`` removes one); empty when none is left."""
    out = dict(current or {})
    out.update(changes)
    return {k: out[k] for k in LIMIT_FIELDS if out.get(k)}


def quota(tokens: object, period: object, param: str = "quota") -> tuple[int, str] | None:
    """A token quota per ``day`` or ``month``; ``tokens`` 0 or ``None`` means none."""
    if period not in PERIODS:
        raise InvalidRequest(f"{param}.period must be one of {', '.join(PERIODS)}",
                             param=f"{param}.period")
    n = 0 if tokens is None else _count(tokens, f"{param}.tokens", MAX_QUOTA)
    return (n, str(period)) if n else None


def allow_ips(value: object, param: str = "allow_ips") -> tuple[str, ...] | None:
    """CIDRs (or addresses), normalised (``10.1.2.3/8`` -> ``10.0.0.0/8``); empty or ``None``:
    no list."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidRequest(f"{param} must be a list of addresses or CIDRs, e.g. "
                             '["10.0.0.0/8"]', param=param)
    try:
        nets = parse_networks(value, param)
    except ValueError as e:
        raise InvalidRequest(str(e), param=param) from None
    return tuple(str(n) for n in nets) or None
