"""What keeps a web page from driving a key-less gateway (``auth.mode: none``).

``none`` mode binds only to loopback, but a browser on the same machine can still reach it: a
``text/plain`` POST with a foreign ``Origin`` needs no CORS preflight, and with DNS rebinding the
page can read the answer too (its ``Host`` is then the attacker's name). So in this mode:

* the ``Host`` must name the loopback interface or the configured bind host (400 otherwise);
* an ``Origin``, when sent, must be a loopback origin (403 otherwise);
* a request with a body must say ``application/json`` (415 otherwise).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fleetgate.api.asgi import Scope, header
from fleetgate.errors import GatewayError, InvalidRequest, PermissionDenied

_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


def _hostname(hostport: str) -> str:
    """``host`` from ``host[:port]``, IPv6 brackets kept off."""
    try:
        host = urlsplit("//" + hostport).hostname
    except ValueError:
        return ""
    return (host or "").lower()


class LoopbackGuard:
    __slots__ = ("allowed",)

    def __init__(self, bind_host: str) -> None:
        self.allowed = {h.strip("[]").lower() for h in _LOOPBACK | {bind_host}} - {""}

    def check(self, scope: Scope) -> None:
        host = header(scope, b"host")
        if host is None or _hostname(host.decode("latin-1")) not in self.allowed:
            raise InvalidRequest(
                "Host not allowed: without keys (auth.mode 'none') the gateway answers only "
                "requests addressed to a loopback name.",
                code="invalid_host",
            )
        origin = header(scope, b"origin")
        if origin is not None:
            o = origin.decode("latin-1")
            parts = urlsplit(o) if o != "null" else None
            if (
                parts is None
                or parts.scheme not in ("http", "https")
                or _hostname(parts.netloc) not in self.allowed
            ):
                raise PermissionDenied(
                    "Cross-origin requests are refused without keys (auth.mode 'none').",
                    code="forbidden_origin",
                )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = (header(scope, b"content-type") or b"").split(b";", 1)[0].strip().lower()
            if ctype != b"application/json":
                raise UnsupportedMediaType(
                    "Send the body as 'Content-Type: application/json'."
                )
