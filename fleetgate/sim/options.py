"""The simulator's settings: one frozen value, checked once when it is built.

:class:`SimOptions` is the whole contract between the ``fleetgate sim`` command, the library
entry points in :mod:`fleetgate.sim.server` and the ASGI app in :mod:`fleetgate.sim.app`.
Building one with a nonsensical value (negative delay, probability above 1, ...) raises
``ValueError`` naming the field, so a bad flag fails before anything listens.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 16
"""Tokens generated when a request names neither ``max_tokens`` nor ``max_completion_tokens``."""

MAX_TOKENS_CAP = 4096
"""Upper bound on tokens per choice, whatever the request asks for."""

MAX_N = 128
"""Upper bound on ``n`` (choices per request), as in OpenAI's API."""

CRASH_EXIT_CODE = 3
"""Exit status of a simulated crash (``crash_after_requests``, ``crash_probability``)."""


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Everything that shapes one simulator process. Field names match the CLI flags."""

    models: tuple[str, ...] = ("sim-model",)
    """Served model names; the first one is the primary name. Others are aliases."""
    host: str = "127.0.0.1"
    port: int = 8100
    """TCP port; 0 picks a free one (see :func:`fleetgate.sim.server.running`)."""
    ttft_ms: float = 50.0
    """Delay before the first token (streaming) or part of the total delay (non-streaming)."""
    tokens_per_s: float = 50.0
    """Token rate after the first token; 0 or negative means as fast as possible."""
    startup_delay_s: float = 0.0
    """Seconds to sleep before binding the port, like an engine loading weights."""
    embedding_dim: int = 16
    api_key: str | None = None
    """When set, ``/v1/*`` requires ``Authorization: Bearer <api_key>`` (like vLLM)."""
    crash_after_requests: int | None = None
    """Exit with :data:`CRASH_EXIT_CODE` once this many inference requests have finished."""
    crash_probability: float = 0.0
    """Each inference request makes the process exit at once with this probability."""
    seed: int | None = None
    """Seeds the crash dice, so a crash schedule can be replayed."""
    hang_on_start: bool = False
    """Never bind the port at all: an engine stuck while loading."""
    fail_mid_stream_after: int | None = None
    """Streams are cut (transport closed, no ``[DONE]``) after this many token chunks."""
    max_model_len: int = 8192
    """Reported in ``/v1/models``, as vLLM does; not enforced."""
    access_log: bool = False
    """Log one line per request (off by default: it costs throughput in benchmarks)."""

    def __post_init__(self) -> None:
        if not self.models or any(not m for m in self.models):
            raise ValueError("models: at least one non-empty model name is required")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        for name in ("ttft_ms", "startup_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if not 1 <= self.embedding_dim <= 65536:
            raise ValueError("embedding_dim: must be between 1 and 65536")
        if not 0.0 <= self.crash_probability <= 1.0:
            raise ValueError("crash_probability: must be between 0 and 1")
        if self.crash_after_requests is not None and self.crash_after_requests < 1:
            raise ValueError("crash_after_requests: must be >= 1")
        if self.fail_mid_stream_after is not None and self.fail_mid_stream_after < 0:
            raise ValueError("fail_mid_stream_after: must be >= 0")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key: must not be empty when given")

    @property
    def model(self) -> str:
        """The primary served model name."""
        return self.models[0]
