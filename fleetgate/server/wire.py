"""Bytes on the wire: status lines, the cached ``Date`` header, response heads, and the
answers the server gives by itself (400, 408, 413, 431, 503, 505) before any app runs.

Everything here is pure and allocation-light: the status lines are built once at import, and
the ``Date`` line is rebuilt once a second by the server (:class:`DateHeader`), never per
request. The server's own refusals use the gateway's one OpenAI-shaped error envelope
(:mod:`fleetgate.errors`), so a client sees the same shape whoever refused it.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from http import HTTPStatus

from fleetgate.errors import GatewayError, InvalidRequest, Unavailable

STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# RFC 9110 token characters for names; values may hold anything but control characters
# (horizontal tab allowed). Checked on every response header the app sends, so an app relaying
# upstream text can never split a response.
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status!r}")
        line = b"HTTP/1.1 %d \r\n" % status
    return line


# Headers already checked. An app sends the same few again and again (content-type, its own
# marker headers, small content-lengths), so most checks are one set lookup; bounded in size.
# Values that change on every response (a rate limit's remaining count, its reset) are plain
# letters and digits: ``isalnum`` (C, no regex) clears them without filling the cache.
_CHECKED: set[tuple[bytes, bytes]] = set()
_CHECKED_MAX = 4096
_GOOD_NAMES: set[bytes] = set()


def check_header(name: bytes, value: bytes) -> None:
    pair = (name, value)
    if pair in _CHECKED:
        return
    if name in _GOOD_NAMES and value.isalnum():
        return
    if not name or _BAD_NAME.search(name) or _BAD_VALUE.search(value):
        raise ValueError(f"invalid response header {name[:100]!r}")
    if len(_GOOD_NAMES) < _CHECKED_MAX:
        _GOOD_NAMES.add(name)
    if len(_CHECKED) < _CHECKED_MAX and len(value) <= 256:
        _CHECKED.add(pair)


class DateHeader:
    """The ``date: ...\\r\\n`` line, refreshed by the server once a second."""

    __slots__ = ("line", "_second")

    def __init__(self) -> None:
        self.line = b""
        self._second = -1
        self.refresh()

    def refresh(self) -> None:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self.line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"


# -- the server's own refusals ---------------------------------------------------------------


class BadRequest(InvalidRequest):
    code = "bad_request"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class VersionNotSupported(GatewayError):
    status = 505
    type = "invalid_request_error"
    code = "http_version_not_supported"


class ServerBusy(Unavailable):
    code = "server_busy"


def refusal(err: GatewayError, date: bytes) -> bytes:
    """A complete response for ``err`` that closes the connection."""
    body = err.to_bytes()
    head = [
        status_line(err.status),
        date,
        b"content-type: application/json\r\n",
        b"x-fleetgate-source: gateway\r\n",
        b"connection: close\r\n",
        b"content-length: %d\r\n" % len(body),
    ]
    for k, v in err.headers.items():
        head.append(k.encode() + b": " + v.encode() + b"\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


