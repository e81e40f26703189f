"""The one error envelope: OpenAI's shape plus ``source``, the SSE framing that ends a broken
stream, ``Retry-After`` on every 503, and config errors that name the file and each problem."""

from __future__ import annotations

import orjson
import pytest

from fleetgate.errors import (
    AuthError,
    ConfigError,
    GatewayError,
    InvalidRequest,
    PermissionDenied,
    StoreUnavailable,
    Unavailable,
)


@pytest.mark.parametrize(("error", "status", "code"), [
    (AuthError("no"), 401, "invalid_api_key"),
    (PermissionDenied("no"), 403, "model_not_allowed"),
    (InvalidRequest("no", param="n"), 400, "invalid_request"),
    (InvalidRequest("no", code="invalid_json"), 400, "invalid_json"),
    (StoreUnavailable("no"), 503, "auth_store_unavailable"),
    (Unavailable("no", code="queue_full"), 503, "queue_full"),
])
def test_the_envelope_is_openais_shape_with_the_class_code_unless_overridden(
    error: GatewayError, status: int, code: str
) -> None:
    assert error.status == status and error.error_code == code
    assert orjson.loads(error.to_bytes()) == {"error": {
        "message": "no", "type": error.type, "param": error.param, "code": code,
        "source": "gateway",
    }}


def test_a_broken_stream_ends_with_one_sse_data_event() -> None:
    e = Unavailable("The replica went away.", code="upstream_closed")
    event = e.sse_event()
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    assert event.count(b"\n") == 2
    assert orjson.loads(event[len(b"data: "):]) == e.body()


@pytest.mark.parametrize(("given", "want"), [(None, 5), (30, 30), (1, 1), (0, 1), (-4, 1)])
def test_every_503_carries_retry_after_of_at_least_a_second(given: int | None, want: int) -> None:
    e = Unavailable("busy") if given is None else Unavailable("busy", retry_after=given)
    assert e.retry_after == want and e.headers == {"retry-after": str(want)}
    assert e.message == "busy" and e.error_code == "model_unavailable" and e.internal is None
    inner = Unavailable("busy", internal="probe: connection refused to 10.0.0.7:8000")
    assert inner.internal == "probe: connection refused to 10.0.0.7:8000"
    assert b"10.0.0.7" not in inner.to_bytes()  # only admins are shown the internal note


def test_a_config_error_names_the_file_and_every_problem() -> None:
    e = ConfigError(["models[0].name: field required", "auth.mode: bad"], path="gw.yaml")
    assert str(e) == "gw.yaml: models[0].name: field required; auth.mode: bad"
    assert e.problems == ["models[0].name: field required", "auth.mode: bad"]
    assert e.path == "gw.yaml"
    assert str(ConfigError(["x: bad"])) == "x: bad"
