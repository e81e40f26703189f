"""The routing table the data plane reads: which replicas of a model can take a request now.

The request path calls :meth:`Pool.acquire` and gets a :class:`Lease` (a replica URL plus an
in-flight slot) or an :class:`~fleetgate.errors.Unavailable` with ``Retry-After``. It never waits
on a launcher or a health check: those belong to the control plane, which publishes replica
state here. ``acquire``/``release`` are synchronous and O(replicas); they never block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetgate.config import ModelSettings, Settings
from fleetgate.errors import ModelNotFound, Unavailable


@dataclass(eq=False)
class Replica:
    id: str
    url: str
    inflight: int = 0
    healthy: bool = True


@dataclass(eq=False)
class ModelGroup:
    settings: ModelSettings
    replicas: list[Replica] = field(default_factory=list)


class Lease:
    """One request's hold on one replica. Release exactly once."""

    __slots__ = ("replica", "_released")

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._released = False
        replica.inflight += 1

    @property
    def url(self) -> str:
        return self.replica.url

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.replica.inflight -= 1


class Pool:
    def __init__(self, settings: Settings) -> None:
        self.groups: dict[str, ModelGroup] = {}
        for m in settings.models:
            g = ModelGroup(m)
            for i, url in enumerate(m.backend.urls):
                g.replicas.append(Replica(id=f"{m.name}-{i}", url=url))
            self.groups[m.name] = g

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def acquire(self, model: str) -> Lease:
        g = self.groups.get(model)
        if g is None:
            raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
        best: Replica | None = None
        for r in g.replicas:
            if r.healthy and (best is None or r.inflight < best.inflight):
                best = r
        if best is None:
            raise Unavailable(f"The model '{model}' has no ready replica.", retry_after=5)
        return Lease(best)
