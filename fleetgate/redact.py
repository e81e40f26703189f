"""One redaction for everything FleetGate writes where people can read it.

Every log record (through a log-record factory, so every handler sees it: the gateway's own,
the HTTP server's access log, uvicorn's, handlers configured after start-up), the local
launcher's state files and banners, replica log tails shown in the gateway log, errors and
``fleet status`` pass through :func:`redact`. It replaces

- *known secrets*, registered at start-up (:func:`register_settings`): every model's upstream
  ``api_key``, static ``auth.tokens``/``auth.admin_tokens``, the store URL's password, the values
  of ``--api-key``-like flags and secret-looking ``env`` entries of local backends;
- *patterns*, for secrets nobody registered: FleetGate keys (``fg-`` + 43 characters, shown as
  their display prefix), ``Bearer <token>``, ``--api-key X`` / ``--api-key=X`` (and ``--token``,
  ``--password``, ``--secret``), ``api_key=``/``key=``/``token=``/``password=`` query or form
  parameters, and the password in ``scheme://user:password@host`` URLs.

Promises: :func:`redact` is pure and linear in its input; :func:`install` is idempotent and
never raises from inside logging (a record that can't be redacted is logged as a placeholder,
never verbatim). Known secrets shorter than 6 characters are not registered (they would
blank out ordinary words); the patterns still catch them in flags, headers and URLs.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

MASK = "***"
_MIN_SECRET = 6

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # A FleetGate key: keep the display prefix (fg- + 6), which is what the store shows.
    (re.compile(r"\b(fg-[A-Za-z0-9_-]{6})[A-Za-z0-9_-]{10,}"), r"\1" + MASK),
    (re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/=-]{4,}"), r"\1\2" + MASK),
    (
        re.compile(
            r"(?i)(--(?:[a-z0-9-]*-)?(?:api-?key|token|password|passwd|secret))(=|\s+)"
            r"(?:'[^']*'|\"[^\"]*\"|[^\s'\"]+)"
        ),
        r"\1\2" + MASK,
    ),
    (
        re.compile(
            r"(?i)([?&;\s\"'](?:api[_-]?key|key|access[_-]?token|token|password|secret)=)"
            r"[^&\s\"']+"
        ),
        r"\1" + MASK,
    ),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@"), r"\1" + MASK + "@"),
]

_lock = threading.Lock()
_known: frozenset[str] = frozenset()
_known_re: re.Pattern[str] | None = None
_SECRET_ENV = re.compile(r"(?i)(key|token|secret|password|passwd|credential)")


def register(secrets: Iterable[str | None]) -> None:
    """Add secrets to redact verbatim wherever they appear."""
    global _known, _known_re
    new = {s for s in secrets if s and len(s) >= _MIN_SECRET}
    with _lock:
        if new <= _known:
            return
        _known = _known | new
        # Longest first, so a secret that contains another is masked whole.
        alts = sorted(_known, key=len, reverse=True)
        _known_re = re.compile("|".join(re.escape(s) for s in alts))


def _flag_values(parts: Iterable[str]) -> list[str]:
    """Values of ``--api-key X`` / ``--api-key=X``-like flags in an argv."""
    out: list[str] = []
    flag = re.compile(r"(?i)^--(?:[a-z0-9-]*-)?(?:api-?key|token|password|passwd|secret)(?:=(.*))?$")
    items = list(parts)
    for i, p in enumerate(items):
        m = flag.match(p)
        if m is None:
            continue
        if m.group(1) is not None:
            out.append(m.group(1))
        elif i + 1 < len(items):
            out.append(items[i + 1])
    return out


def register_settings(settings: Any) -> None:
    """Register every secret a loaded :class:`~fleetgate.config.Settings` holds."""
    import shlex

    from sqlalchemy.engine import make_url

    found: list[str | None] = []
    auth = settings.auth
    found += [*auth.tokens, *auth.admin_tokens]
    try:
        found.append(make_url(settings.store.url).password)
    except Exception:  # a URL SQLAlchemy can't parse has no password to find
        pass
    for m in settings.models:
        found.append(m.api_key)
        b = m.backend
        command = getattr(b, "command", None)
        if command is not None:
            try:
                argv = shlex.split(command) if isinstance(command, str) else list(command)
            except ValueError:
                argv = []
            found += _flag_values(argv)
        for k, v in (getattr(b, "env", None) or {}).items():
            if _SECRET_ENV.search(k):
                found.append(v)
    register(str(s) if s is not None else None for s in found)


def redact(text: str) -> str:
    """``text`` with every known secret and secret-looking pattern masked."""
    if not text:
        return text
    known = _known_re
    if known is not None:
        text = known.sub(MASK, text)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_argv(argv: Iterable[str]) -> list[str]:
    """An argv safe to store or show: flag values and known secrets masked."""
    items = list(argv)
    out: list[str] = []
    hide_next = False
    flag = re.compile(r"(?i)^--(?:[a-z0-9-]*-)?(?:api-?key|token|password|passwd|secret)$")
    for p in items:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        hide_next = flag.match(p) is not None
        out.append(redact(p))
    return out


class _Redacted:
    """Wraps a log argument so that ``%s`` and ``%r`` render it redacted."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __str__(self) -> str:
        return redact(str(self.obj))

    def __repr__(self) -> str:
        return redact(repr(self.obj))


def _clean_arg(a: object) -> object:
    if isinstance(a, str):
        return redact(a)
    if a is None or isinstance(a, int | float):
        return a  # keeps %d and %f working
    return _Redacted(a)


def scrub_record(record: logging.LogRecord) -> None:
    """Redact a record in place: its message, arguments and traceback text."""
    try:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        else:
            record.msg = _Redacted(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_clean_arg(a) for a in args)
        elif isinstance(args, dict):
            record.args = {k: _clean_arg(v) for k, v in args.items()}
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
    except Exception:  # never log a secret because redaction itself failed
        record.msg, record.args = "<log record withheld: redaction failed>", ()
        record.exc_info = record.exc_text = None


class RedactingFilter(logging.Filter):
    """The same redaction as a filter, for handlers configured from a dict (``()``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


_installed = False


def install() -> None:
    """Redact every log record this process creates, whichever handler writes it."""
    global _installed
    with _lock:
        if _installed:
            return
        base = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = base(*args, **kwargs)
            scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
