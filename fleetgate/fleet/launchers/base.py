"""The one interface every way of running replicas implements.

A launcher does I/O and nothing else: it starts something (a local process, a SLURM job, a
Kubernetes pod), says whether it still runs, stops it, and finds what a previous gateway run
left behind. It never decides how many replicas to run and never talks to the data plane.
Health (HTTP ``/health``) is probed by the supervisor, the same for every launcher.

All methods are coroutines so a launcher may shell out (``sbatch``) without blocking the loop.
``poll`` runs every :meth:`Launcher.poll_every_s` (default: the fleet's readiness interval); a
launcher that talks to a scheduler sets a longer cadence and answers from what it last learned.

A replica's address need not be known at start: a launcher may return a :class:`Handle` with an
empty ``url`` and report the address later in :attr:`Observed.url` (a SLURM job learns its node
only once it runs). Backend-specific knowledge stays behind this interface: the fleet reads a
backend's generic knobs through :meth:`fleetgate.fleet.spec.BackendSpec.lifecycle`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from fleetgate.fleet.spec import FleetSettings

#: Where a launched job reports its engine's address (see :class:`AcceptsCallbacks`).
CALLBACK_PATH = "/v1/fleet/callback"


def config_digest(model: str, backend: BaseModel) -> str:
    """Identifies what a replica was started from; adoption requires it unchanged."""
    return hashlib.sha256(f"{model}\0{backend.model_dump_json()}".encode()).hexdigest()[:16]


class LaunchError(Exception):
    """A replica could not be started. ``kind`` is short and stable (used as a metric label)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class LaunchSpec:
    model: str
    replica_id: str
    backend: Any  # the model's backend config (spec.StaticBackend, spec.LocalBackend, ...)
    served_name: str
    slot: int = 0  # which of a static backend's URLs


@dataclass
class Handle:
    """What a launcher needs to find its replica again; ``info`` is JSON-safe, for state files."""

    replica_id: str
    model: str
    url: str  # "" until the launcher learns the address (see Observed.url)
    info: dict[str, Any] = field(default_factory=dict)
    adopted: bool = False


@dataclass(frozen=True)
class Observed:
    running: bool  # the replica exists (a queued job counts: it is on its way)
    exit_code: int | None = None
    detail: str = ""  # why it stopped, with a log tail where there is one
    kind: str = ""  # short and stable when not running: exited, killed, port_taken, gone
    url: str | None = None  # the address, once learned; None: unchanged
    started: bool = True  # False while queued: the start timeout counts from when this is True
    note: str = ""  # for every caller allowed the model: e.g. "queued in SLURM: Resources"
    eta_s: float | None = None  # the queue's own estimate of seconds until it starts
    ends_in_s: float | None = None  # seconds left before a time limit ends it (handover)
    public: dict[str, Any] = field(default_factory=dict)  # status fields any caller may see
    private: dict[str, Any] = field(default_factory=dict)  # status fields only admins see


class Launcher(Protocol):
    #: False for launchers that only point at things others run (static): never restarted,
    #: never failed for a crash loop, just probed until they answer again.
    manages_processes: bool

    async def start(self, spec: LaunchSpec) -> Handle: ...

    def attach(self, spec: LaunchSpec) -> Handle | None:
        """A handle at once, for what already runs (a static URL); None when it must start."""
        ...

    async def poll(self, handle: Handle) -> Observed: ...

    async def stop(self, handle: Handle, grace_s: float | None = None) -> None: ...

    async def adopt(self) -> list[Handle]: ...

    def forget(self, handle: Handle) -> None:
        """Drop the record of a replica left running on purpose (keep_on_shutdown)."""
        ...

    def log_tail(self, handle: Handle, lines: int = 1) -> str: ...

    def poll_every_s(self, handle: Handle) -> float | None:
        """How often the supervisor should call :meth:`poll`; None: every readiness interval."""
        ...

    def handover_before_s(self, handle: Handle) -> float | None:
        """Start a successor this long before :attr:`Observed.ends_in_s` runs out; None: never."""
        ...

    async def aclose(self) -> None:
        """Release what the launcher itself holds (not its replicas); at gateway shutdown."""
        ...


@runtime_checkable
class AcceptsCallbacks(Protocol):
    """A launcher whose replicas report their address to the gateway (``POST /v1/fleet/callback``).

    ``accept_callback`` answers None when the callback is accepted, else why not (shown to
    nobody but the log: a caller with a wrong token learns nothing).
    """

    def accept_callback(self, replica_id: str, token: str, host: str, port: int) -> str | None: ...


class LauncherBase:
    """Defaults for the optional parts of :class:`Launcher`."""

    def attach(self, spec: LaunchSpec) -> Handle | None:
        return None

    def poll_every_s(self, handle: Handle) -> float | None:
        return None

    def handover_before_s(self, handle: Handle) -> float | None:
        return None

    async def aclose(self) -> None:
        return None


class PassiveLauncher(LauncherBase):
    """Shared no-ops for launchers that own no processes: nothing to adopt, stop or log."""

    async def stop(self, handle: Handle, grace_s: float | None = None) -> None:
        return None

    async def adopt(self) -> list[Handle]:
        return []

    def forget(self, handle: Handle) -> None:
        return None

    def log_tail(self, handle: Handle, lines: int = 1) -> str:
        return ""


class NullLauncher(PassiveLauncher):
    """Does nothing: replicas are 'running' at a fixed URL. For tests of the control loop."""

    manages_processes = True

    def __init__(self, fleet: FleetSettings | None = None, url: str = "http://127.0.0.1:9") -> None:
        self.url = url
        self.started: list[LaunchSpec] = []
        self.stopped: list[str] = []

    async def start(self, spec: LaunchSpec) -> Handle:
        self.started.append(spec)
        return Handle(spec.replica_id, spec.model, self.url)

    async def poll(self, handle: Handle) -> Observed:
        return Observed(running=handle.replica_id not in self.stopped)

    async def stop(self, handle: Handle, grace_s: float | None = None) -> None:
        self.stopped.append(handle.replica_id)
