"""API key format and digests.

A key is ``fg-`` followed by 43 URL-safe base64 characters (32 random bytes). The store holds
only ``sha256(key)`` in hex and a display prefix (``fg-`` plus 6 characters), which is all that
may ever appear in a message or a log.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets

KEY_PREFIX = "fg-"
_RANDOM_BYTES = 32
_BODY_LEN = 43  # len(base64url(32 bytes)) without padding
_KEY_RE = re.compile(r"^fg-[A-Za-z0-9_-]{43}$")
DISPLAY_LEN = len(KEY_PREFIX) + 6


def generate() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def display_prefix(key: str) -> str:
    """The part of a key that is safe to show. Never more than ``DISPLAY_LEN`` characters."""
    return key[:DISPLAY_LEN]


def well_formed(key: str) -> bool:
    return bool(_KEY_RE.match(key))


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


MAX_DURATION_S = 100 * 365 * 86400


def parse_duration(text: str) -> dt.timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` -> timedelta. Raises ValueError otherwise."""
    m = _DURATION.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"invalid duration {text!r}: use a positive number and s, m, h, d or w")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION_S:  # past it, dates overflow (a traceback, not an answer)
        raise ValueError(f"invalid duration {text!r}: at most 100 years")
    return dt.timedelta(seconds=seconds)
