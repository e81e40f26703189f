"""The exception tree and the one OpenAI-shaped error envelope.

Every error the gateway itself produces is a :class:`GatewayError`. It renders to OpenAI's
``{"error": {"message", "type", "param", "code"}}`` shape, plus ``"source": "gateway"`` so a
user can tell a gateway refusal from an upstream one (upstream errors are relayed untouched).
Messages never carry secrets: at most a key's display prefix.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


class GatewayError(Exception):
    """Base class. Subclasses fix ``status``, ``type`` and ``code``."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code_override: str | None = code
        else:
            self.code_override = None
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def error_code(self) -> str | None:
        return self.code_override if self.code_override is not None else self.code

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.error_code,
                "source": "gateway",
            }
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def sse_event(self) -> bytes:
        """The error as one SSE ``data:`` event, used to end a stream that broke mid-way."""
        return b"data: " + self.to_bytes() + b"\n\n"


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class AuthError(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(GatewayError):
    """The change clashes with what is stored: a name taken, a group still in use."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class QuotaExceeded(GatewayError):
    """A token quota for the period is spent: retrying before it resets won't help."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamUnreachable(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_unreachable"


class Unavailable(GatewayError):
    """The model can't serve now. Always carries ``Retry-After``."""

    status = 503
    type = "server_error"
    code = "model_unavailable"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int = 5,
        code: str | None = None,
        internal: str | None = None,
    ) -> None:
        super().__init__(message, code=code, headers={"retry-after": str(max(1, retry_after))})
        self.retry_after = max(1, retry_after)
        # What only an admin may see (a probe error, an internal URL, a job's script error).
        self.internal = internal


class StoreUnavailable(Unavailable):
    """The key store can't be read: fail closed."""

    code = "auth_store_unavailable"


class LimitsUnavailable(Unavailable):
    """The shared limits store (Redis) can't be reached: fail closed."""

    code = "limits_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class ConfigError(Exception):
    """A bad configuration file. Raised at load time, never during a request."""

    def __init__(self, problems: list[str], path: str | None = None) -> None:
        self.problems = problems
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(problems))
