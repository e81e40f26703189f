"""The one interface every way of running replicas implements.

A launcher does I/O and nothing else: it starts something (a local process, a SLURM job, a
Kubernetes pod), says whether it still runs, stops it, and finds what a previous gateway run
left behind. It never decides how many replicas to run and never talks to the data plane.
Health (HTTP ``/health``) is probed by the supervisor, the same for every launcher.

All methods are coroutines so a launcher may shell out (``sbatch``) without blocking the loop;
``poll`` must be cheap, it runs every readiness interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from fleetgate.fleet.spec import FleetSettings


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
    url: str
    info: dict[str, Any] = field(default_factory=dict)
    adopted: bool = False


@dataclass(frozen=True)
class Observed:
    running: bool
    exit_code: int | None = None
    detail: str = ""  # why it stopped, with a log tail where there is one
    kind: str = ""  # short and stable when not running: exited, killed, port_taken, gone


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


class PassiveLauncher:
    """Shared no-ops for launchers that own no processes: nothing to adopt, stop or log."""

    def attach(self, spec: LaunchSpec) -> Handle | None:
        return None

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
