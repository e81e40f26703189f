"""Launchers by backend ``type``, resolved once when the fleet is built.

A new launcher is one module plus a line here (and its config model in
:data:`fleetgate.fleet.spec.Backend`); nothing on the request path changes when one joins.
"""

from __future__ import annotations

from collections.abc import Callable

from fleetgate.fleet.launchers.base import (
    AcceptsCallbacks,
    Handle,
    Launcher,
    LaunchError,
    LaunchSpec,
    NullLauncher,
    Observed,
)
from fleetgate.fleet.launchers.local import LocalLauncher
from fleetgate.fleet.launchers.slurm import SlurmLauncher
from fleetgate.fleet.launchers.static import StaticLauncher
from fleetgate.fleet.spec import FleetSettings

LAUNCHERS: dict[str, Callable[[FleetSettings], Launcher]] = {
    "static": StaticLauncher,
    "local": LocalLauncher,
    "slurm": SlurmLauncher,
}

__all__ = [
    "LAUNCHERS",
    "AcceptsCallbacks",
    "Handle",
    "LaunchError",
    "LaunchSpec",
    "Launcher",
    "LocalLauncher",
    "NullLauncher",
    "SlurmLauncher",
    "Observed",
    "StaticLauncher",
]
