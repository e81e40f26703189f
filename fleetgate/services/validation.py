"""Checks on what callers send: names, roles, model patterns, weights, durations.

Each raises :class:`~fleetgate.errors.InvalidRequest` naming the field (``param``).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from enum import Enum

from fleetgate.auth.principals import ROLES
from fleetgate.errors import InvalidRequest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}$")
MAX_PATTERNS = 200
MAX_PATTERN_LEN = 200
MAX_WEIGHT = 1e6
MAX_OVERLAP = dt.timedelta(days=30)


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
