"""The pipeline's ``admit`` step: limits, quotas and fair share, for one request.

:class:`Admitter` turns a principal (the limits and quotas set on its user, groups and key,
computed when the key was loaded) and a model route (the model's own limits and admission
policy) into :class:`~fleetgate.limits.spec.Checks`, once per (principal, model), and asks the
limits backend (``limits.backend``: ``memory`` in this process, ``redis`` across processes and
gateways) to take from every counter that applies. What it returns is settled with the real
usage when the request ends (:meth:`Grant.settle`), however it ends.

A request with nothing to check costs a dict lookup: no backend call, no headers.

Fair share: a model with ``admission.max_inflight_per_replica`` gets a
:class:`~fleetgate.limits.fairshare.FairGate` with that many slots per ready replica. A request
that finds them all taken waits in its user's queue and is dispatched in weighted-fair order (the
weight is the highest of the user's groups' weights), bounded by ``max_queue`` and
``queue_timeout_s``. The gate is per gateway process.
"""

from __future__ import annotations

from collections.abc import Awaitable

from fleetgate.auth.principals import Principal
from fleetgate.dataplane.request import ParsedRequest
from fleetgate.dataplane.routes import ModelRoute
from fleetgate.limits.backend import NO_LIMITS, Backend, Grant, admit
from fleetgate.limits.fairshare import FairGate, Slot
from fleetgate.limits.spec import Checks, Limits, Subject

_CACHE_LIMIT = 50_000


def model_limits(route: ModelRoute) -> tuple[tuple[Subject, Limits], ...]:
    lim = route.settings.limits
    limits = Limits(lim.rpm, lim.tpm, lim.max_concurrent, lim.max_tokens, lim.max_n)
    return () if limits.empty else ((Subject("model", route.name), limits),)


class Admitter:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        # id(principal) -> (principal, model -> checks). The principal is kept so its id can't
        # be reused while the entry lives; a reloaded key is a new principal, hence a new entry.
        self._checks: dict[int, tuple[Principal, dict[str, Checks]]] = {}
        self._model_limits: dict[str, tuple[tuple[Subject, Limits], ...]] = {}
        self._gates: dict[str, FairGate] = {}

    def checks(self, principal: Principal, route: ModelRoute) -> Checks:
        entry = self._checks.get(id(principal))
        if entry is None or entry[0] is not principal:
            if len(self._checks) >= _CACHE_LIMIT:
                self._checks.clear()
            entry = (principal, {})
            self._checks[id(principal)] = entry
        per_model = entry[1]
        found = per_model.get(route.name)
        if found is None:
            own = self._model_limits.get(route.name)
            if own is None:
                own = self._model_limits[route.name] = model_limits(route)
            found = Checks.of(principal.limits + own, principal.quotas)
            per_model[route.name] = found
        return found

    def admit(
        self, principal: Principal, route: ModelRoute, req: ParsedRequest
    ) -> Grant | Awaitable[Grant]:
        checks = self.checks(principal, route)
        if checks.empty:
            return NO_LIMITS
        return admit(
            self.backend,
            checks,
            body_bytes=req.size,
            max_tokens=req.max_tokens,
            n=req.n,
            default_max_tokens=route.settings.admission.default_max_tokens,
            generates=req.generates,
        )

    def gate(self, route: ModelRoute) -> FairGate | None:
        policy = route.settings.admission
        if policy.max_inflight_per_replica is None:
            return None
        g = self._gates.get(route.name)
        if g is None:
            g = self._gates[route.name] = FairGate(
                slots=policy.max_inflight_per_replica,
                policy=policy.policy,
                max_queue=policy.max_queue,
                queue_timeout_s=policy.queue_timeout_s,
            )
        return g

    @staticmethod
    def resize(gate: FairGate, route: ModelRoute, ready: int) -> None:
        """Slots follow the ready replicas; a cold model still lets one replica's worth in,
        so those requests wait for the cold start rather than in the queue."""
        cap = route.settings.admission.max_inflight_per_replica or 1
        n = max(1, ready) * cap
        if n != gate.slots:
            gate.set_slots(n)

    def forget(self, model: str) -> None:
        """A route went away (dynamic models): drop what was kept for it."""
        self._model_limits.pop(model, None)
        self._gates.pop(model, None)
        for _, per_model in self._checks.values():
            per_model.pop(model, None)


__all__ = ["Admitter", "Grant", "Slot", "model_limits"]
