"""Local-account passwords: argon2id hashes (``argon2-cffi``), verified in constant time.

:func:`hash_password` and :func:`verify` are CPU-heavy on purpose (tens of milliseconds): call
them from a worker thread on the server. :func:`verify` never raises for a wrong or malformed
hash; it answers ``False``. :func:`burn` spends the same work for a user that doesn't exist, so
a sign-in's timing doesn't tell whether the name is known.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 8
MAX_LENGTH = 1024  # argon2 takes any length; a bound keeps a hostile form from costing more

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
_DUMMY = _hasher.hash("fleetgate: a password nobody has")


def check_new(password: str) -> None:
    """Raise ``ValueError`` for a password we won't store."""
    if len(password) < MIN_LENGTH:
        raise ValueError(f"a password needs at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise ValueError(f"a password has at most {MAX_LENGTH} characters")
    if "\x00" in password:
        raise ValueError("a password can't contain a NUL character")


def hash_password(password: str) -> str:
    check_new(password)
    return _hasher.hash(password)


def verify(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored`` (an argon2 hash); ``None`` never matches."""
    if not password or len(password) > MAX_LENGTH:
        return False
    if stored is None:
        burn(password)
        return False
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def burn(password: str) -> None:
    """The cost of one verification, for a name with no password (timing stays the same)."""
    try:
        _hasher.verify(_DUMMY, password[:MAX_LENGTH] or "x")
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        pass
