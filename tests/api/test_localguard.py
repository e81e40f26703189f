"""``auth.mode: none``: a web page can't drive the key-less gateway (Host, Origin, type)."""

from __future__ import annotations

import pytest

from fleetgate.api.localguard import LoopbackGuard
from fleetgate.errors import GatewayError


def scope(method: str = "POST", **headers: str) -> dict[str, object]:
    hs = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"method": method, "headers": hs}


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "127.0.0.1:8000", "content_type": "application/json"},
        {"host": "localhost", "content_type": "application/json; charset=utf-8"},
        {"host": "[::1]:8000", "content_type": "Application/JSON"},
        {"host": "LOCALHOST:1", "origin": "http://localhost:3000",
         "content_type": "application/json"},
        {"host": "gw.internal:8000", "content_type": "application/json"},  # the bind host
    ],
)
def test_loopback_requests_pass(headers: dict[str, str]) -> None:
    LoopbackGuard("gw.internal").check(scope(**headers))


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"content_type": "application/json"}, 400, "invalid_host"),
        ({"host": "evil.example:8000", "content_type": "application/json"}, 400, "invalid_host"),
        ({"host": "127.0.0.1.evil.example", "content_type": "application/json"}, 400,
         "invalid_host"),
        ({"host": "127.0.0.1:8000", "origin": "http://evil.example",
          "content_type": "application/json"}, 403, "forbidden_origin"),
        ({"host": "127.0.0.1:8000", "origin": "null", "content_type": "application/json"}, 403,
         "forbidden_origin"),
        ({"host": "127.0.0.1:8000", "origin": "file://localhost",
          "content_type": "application/json"}, 403, "forbidden_origin"),
        ({"host": "127.0.0.1:8000", "content_type": "text/plain"}, 415,
         "unsupported_media_type"),
        ({"host": "127.0.0.1:8000"}, 415, "unsupported_media_type"),
        ({"host": "127.0.0.1:8000",
          "content_type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ],
)
def test_foreign_host_origin_and_types_are_refused(
    headers: dict[str, str], status: int, code: str
) -> None:
    with pytest.raises(GatewayError) as e:
        LoopbackGuard("127.0.0.1").check(scope(**headers))
    assert (e.value.status, e.value.error_code) == (status, code)


def test_get_needs_no_content_type() -> None:
    LoopbackGuard("127.0.0.1").check(scope("GET", host="127.0.0.1"))
