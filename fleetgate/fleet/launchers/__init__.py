"""Launchers by backend ``type``, resolved once when the pool is built.

SLURM and Kubernetes join this dict; nothing on the request path changes when they do.
"""

from __future__ import annotations

from collections.abc import Callable

from fleetgate.fleet.launchers.base import (
    Handle,
    Launcher,
    LaunchError,
    LaunchSpec,
    NullLauncher,
    Observed,
)
from fleetgate.fleet.launchers.local import LocalLauncher
from fleetgate.fleet.launchers.static import StaticLauncher
from fleetgate.fleet.spec import FleetSettings

LAUNCHERS: dict[str, Callable[[FleetSettings], Launcher]] = {
    "static": StaticLauncher,
    "local": LocalLauncher,
}

__all__ = [
    "LAUNCHERS",
    "Handle",
    "LaunchError",
    "LaunchSpec",
    "Launcher",
    "LocalLauncher",
    "NullLauncher",
    "Observed",
    "StaticLauncher",
]
