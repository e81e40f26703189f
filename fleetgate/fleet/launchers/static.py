"""Static backends: URLs someone else runs. Health-checked by the supervisor; never started,
stopped or restarted here."""

from __future__ import annotations

from fleetgate.fleet.launchers.base import Handle, LaunchSpec, Observed, PassiveLauncher
from fleetgate.fleet.spec import FleetSettings, StaticBackend


class StaticLauncher(PassiveLauncher):
    manages_processes = False

    def __init__(self, fleet: FleetSettings | None = None) -> None:
        self.fleet = fleet

    async def start(self, spec: LaunchSpec) -> Handle:
        return self.attach(spec)

    def attach(self, spec: LaunchSpec) -> Handle:
        backend = spec.backend
        assert isinstance(backend, StaticBackend)
        return Handle(spec.replica_id, spec.model, backend.urls[spec.slot % len(backend.urls)])

    async def poll(self, handle: Handle) -> Observed:
        return Observed(running=True)
