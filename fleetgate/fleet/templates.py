"""Models started on request from an admin's templates (``templates:`` in the config).

A request may name a *model path* (``Qwen/Qwen3-8B``, ``/models/llama``) that no model in the
config has. If a template's ``match`` globs take it, the caller may use it and may launch, the
gateway builds a model from the template with that path and serves it under the path as its
name. The template is the only source of the engine's command, flags, environment and ports:
the request chooses the path and nothing else, and the path reaches the engine as one argv
element (the local launcher never runs a shell; the SLURM launcher quotes every slot).

Pure parts, tested with tables: :func:`check_path` (400 ``invalid_model_path``),
:func:`find_template` (first match wins), :func:`may_launch` and :func:`plan_capacity` (room,
evict the least recently used idle model, or full).

:class:`Templates` is the mechanism. It runs on the event loop thread, as the data plane does,
and never awaits: adding a model is a new :class:`~fleetgate.fleet.group.ModelGroup` and
controller in the pool and a :class:`~fleetgate.dataplane.routes.ModelRoute` in the gateway's
table (each swapped in with one assignment); the controller launches. :meth:`Templates.run` is
a control-plane task that forgets a dynamic model once it has scaled to zero (its idle timeout)
or been swapped out, so it leaves ``/v1/models``; a model that swapped another out launches
only once that one is gone (its controller starts then), so the GPUs it frees are free.
Configured models are never touched here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fleetgate.auth.access import matches
from fleetgate.auth.principals import Principal
from fleetgate.config import ModelSettings, TemplateSettings
from fleetgate.dataplane.routes import ModelRoute, RouteTable
from fleetgate.errors import InvalidRequest, ModelNotFound, PermissionDenied, Unavailable
from fleetgate.fleet.group import ModelGroup
from fleetgate.fleet.pool import Pool
from fleetgate.fleet.replica import TERMINAL
from fleetgate.fleet.spec import ScalingPolicy, retry_after_estimate

log = logging.getLogger("fleetgate.fleet")

MAX_PATH = 200
_PATH = re.compile(r"[A-Za-z0-9._/-]+")

# --- pure: paths, templates, rights, capacity ------------------------------------------------


def _invalid(why: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid model path: {why}.", param="model_path", code="invalid_model_path"
    )


def check_path(path: object, absolute_ok: bool) -> str:
    """``path`` if it is a model path a template may be asked for; else 400
    ``invalid_model_path``. Checked before anything else looks at it."""
    if not isinstance(path, str) or not path:
        raise _invalid("it must be a non-empty string")
    if len(path) > MAX_PATH:
        raise _invalid(f"it is longer than {MAX_PATH} characters")
    # Explicit ASCII ranges: Unicode look-alikes, NUL, spaces and shell characters all fail.
    if not _PATH.fullmatch(path):
        raise _invalid("only A-Z a-z 0-9 . _ / - are allowed")
    if path.startswith("-"):
        raise _invalid("it must not start with '-'")
    if ".." in path.split("/"):
        raise _invalid("it must not have a '..' segment")
    if path.startswith("/") and not absolute_ok:
        raise _invalid("absolute paths are not served here")
    return path


def find_template(
    templates: Sequence[TemplateSettings], path: str
) -> TemplateSettings | None:
    """The first template with a pattern matching ``path`` (``*`` also matches ``/``). An
    absolute path matches only patterns starting with ``/``, a relative one only the others."""
    absolute = path.startswith("/")
    for t in templates:
        for p in t.match:
            if p.startswith("/") == absolute and matches(p, path):
                return t
    return None


def may_launch(principal: Principal, template: TemplateSettings) -> bool:
    """Admins always (their key's model list is checked before); others by group."""
    return principal.admin or any(g in template.launch for g in principal.groups)


def capacity(template: TemplateSettings) -> int:
    """How many models of ``template`` may run at once: ``max_models``, or fewer when the
    backend's GPU list can't hold that many models at their ``max_replicas`` each."""
    per_model = template.scaling.max_replicas
    wanted = ScalingPolicy(min_replicas=0, max_replicas=template.max_models * per_model)
    fits = template.backend.cap_scaling(wanted).max_replicas
    return max(1, min(template.max_models, fits // per_model))


@dataclass(frozen=True)
class Running:
    """A dynamic model as the capacity decision sees it."""

    name: str
    last_used: float  # monotonic time of its last request (or start)
    busy: bool  # a request in flight or waiting
    starting: bool  # no replica ready yet


@dataclass(frozen=True)
class Plan:
    action: Literal["room", "evict", "full"]
    victim: str | None = None
    reason: str = ""


def plan_capacity(running: Sequence[Running], limit: int) -> Plan:
    """Room for one more model, or which one to swap out: the least recently used idle one
    (never busy, never still starting); ``full`` when none may go."""
    if len(running) < limit:
        return Plan("room")
    idle = [r for r in running if not r.busy and not r.starting]
    if not idle:
        starting = sum(1 for r in running if r.starting)
        return Plan(
            "full",
            reason=f"{len(running)} of {limit} models running, none idle "
            f"({starting} starting, {len(running) - starting} serving)",
        )
    victim = min(idle, key=lambda r: (r.last_used, r.name))
    return Plan("evict", victim.name, f"{victim.name} is the least recently used idle model")


# --- the mechanism ---------------------------------------------------------------------------


class Templates:
    """Dynamic models: started from templates, swapped out when full, forgotten at zero."""

    def __init__(
        self,
        templates: Sequence[TemplateSettings],
        pool: Pool,
        routes: RouteTable,
        interval_s: float = 1.0,
    ) -> None:
        self.templates = tuple(templates)
        self.pool = pool
        self.routes = routes
        self.interval_s = interval_s
        self.absolute_ok = any(p.startswith("/") for t in self.templates for p in t.match)
        self.dynamic: dict[str, TemplateSettings] = {}  # served models, by name (the path)
        self.leaving: dict[str, str] = {}  # swapped out, still draining: name -> why
        self.refused: dict[str, str] = {}  # template -> why the last launch was refused
        # A model waiting for the one it swapped out to stop (so its GPUs are free again)
        # before its controller runs: name -> the victim's name.
        self.after: dict[str, str] = {}
        # Told when a model's route goes, so what the data plane cached for it goes too
        # (the admitter's limits and fair-share gate).
        self.on_forget: Callable[[str], None] | None = None
        pool.control.adopter = self._adopt

    def __bool__(self) -> bool:
        return bool(self.templates)

    # --- building a model ------------------------------------------------------------------

    @staticmethod
    def settings_for(t: TemplateSettings, path: str) -> ModelSettings:
        """The model a template makes for ``path``: only the path differs between two."""
        return ModelSettings(
            name=path,
            api_key=t.api_key,
            backend=t.backend.model_copy(update={"model_path": path}),
            **t.policies(),
        )

    def _add(self, t: TemplateSettings, path: str, run: bool = True) -> ModelGroup:
        m = self.settings_for(t, path)
        g = self.pool.add_model(m, run)
        self.dynamic[path] = t
        self.routes.add(ModelRoute.build(m, dynamic=True))
        log.info("model %s added from template %s", path, t.name)
        return g

    def _adopt(self, name: str) -> ModelGroup | None:
        """A leftover replica of ``name`` from a previous run: rebuild its model if a template
        still makes it (the fleet then adopts it when its backend digest is unchanged)."""
        try:
            path = check_path(name, self.absolute_ok)
        except InvalidRequest:
            return None
        t = find_template(self.templates, path)
        if t is None or path in self.dynamic:
            return self.pool.groups.get(path) if t is not None else None
        return self._add(t, path)

    # --- who may, and room --------------------------------------------------------------------

    def _template_for(self, principal: Principal, name: str) -> TemplateSettings:
        path = check_path(name, self.absolute_ok)
        t = find_template(self.templates, path)
        if t is None:
            raise ModelNotFound(f"The model '{path}' does not exist.", param="model")
        if not principal.allows(path):
            raise PermissionDenied(f"This API key may not use the model '{path}'.", param="model")
        return t

    def _running(self, t: TemplateSettings) -> list[Running]:
        out = []
        for name, owner in self.dynamic.items():
            g = self.pool.groups.get(name)
            if owner is not t or g is None:
                continue
            out.append(
                Running(
                    name,
                    last_used=max([g.last_activity, *(r.last_used for r in g.replicas)]),
                    busy=g.inflight() > 0 or g.waiters > 0,
                    starting=not g.routable and (bool(g.live()) or g.demand_at is not None),
                )
            )
        return out

    def _make_room(self, t: TemplateSettings, path: str) -> str | None:
        """None when there is room; else the model swapped out for ``path``, or 503."""
        limit = capacity(t)
        plan = plan_capacity(self._running(t), limit)
        if plan.action == "room":
            return None
        if plan.action == "full" or plan.victim is None:
            why = f"template {t.name} is full: {plan.reason}"
            self.refused[t.name] = why
            raise Unavailable(
                f"Can't start '{path}' now: {why}; retry later.",
                retry_after=retry_after_estimate(t.cold_start, None),
                code="capacity_full",
            )
        victim = plan.victim
        log.info("swapping out %s for %s: %s", victim, path, plan.reason)
        self._forget_route(victim, f"swapped out for {path}")
        self.pool.down(victim)  # drains, then stops; the reaper forgets its group
        return victim

    def _forget_route(self, name: str, why: str) -> None:
        self.routes.remove(name)
        self._forgotten(name)
        self.dynamic.pop(name, None)
        self.leaving[name] = why

    def ensure(self, principal: Principal, name: str) -> ModelGroup:
        """The dynamic model ``name``, started if the caller may launch it. Raises the
        caller's error: 400, 404, 403 (``model_not_allowed``, ``launch_not_allowed``) or 503
        (full, or still being swapped out)."""
        t = self._template_for(principal, name)
        g = self.pool.groups.get(name) if name in self.dynamic else None
        running = g is not None and bool(g.live())
        if not running and not may_launch(principal, t):
            raise PermissionDenied(
                f"This API key may use '{name}' but may not launch it; ask an admin to start it.",
                param="model",
                code="launch_not_allowed",
            )
        if name in self.leaving:
            raise Unavailable(
                f"The model '{name}' is being stopped ({self.leaving[name]}); retry shortly.",
                retry_after=5,
            )
        if g is None:
            victim = self._make_room(t, name)
            self.refused.pop(t.name, None)
            g = self._add(t, name, run=victim is None)
            if victim is not None:
                self.after[name] = victim
        return g

    # --- the data plane's hook and the fleet API ---------------------------------------------

    def route_for(self, principal: Principal, name: str) -> ModelRoute:
        """``Pipeline.authorize`` for a model name not in the route table."""
        try:
            g = self.ensure(principal, name)
        except InvalidRequest as e:
            e.param = "model"  # what the client sent it as
            raise
        g.demand()  # launch now, even if admission awaits before the pool is asked
        route = self.routes.get(name)
        if route is None:  # added above, so only a bug gets here
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        return route

    def up(self, principal: Principal, name: str) -> dict[str, Any]:
        """``POST /up``: start (or keep) the model; answers at once, idempotently."""
        g = self.ensure(principal, name)
        if not g.failed_now():
            # Polling /up is how Autoserve's clients wait: a failure must stay visible to
            # them (until restart.failed_cooldown_s ends), not be cleared by the next poll.
            self.pool.up(name)
        status = g.status()
        if name in self.after:
            return {
                "status": "pending",
                "model": name,
                "detail": f"waiting for {self.after[name]} to stop (swapped out to make room)",
            }
        detail: str | None = None
        if status == "failed":
            detail = g.last_failure.splitlines()[0][:300] if principal.admin else (
                "the model failed to start; an admin can see why in the fleet status"
            )
        elif status != "healthy":
            status = "starting" if status == "starting" else "pending"
            note, _ = g.queue_note()
            detail = note or ("starting the engine" if status == "starting" else "launching")
        return {"status": status, "model": name, "detail": detail}

    def describe(self, principal: Principal) -> list[dict[str, Any]]:
        """The templates, with the dynamic models the caller may see, for the fleet status."""
        out = []
        for t in self.templates:
            names = [n for n, o in self.dynamic.items() if o is t and principal.allows(n)]
            doc: dict[str, Any] = {
                "name": t.name,
                "max_models": capacity(t),
                "models": names,
                "full": self.refused.get(t.name),
            }
            if principal.admin:
                doc["match"] = list(t.match)
                doc["launch"] = list(t.launch)
                doc["leaving"] = dict(self.leaving)
            out.append(doc)
        return out

    # --- forgetting models at zero -----------------------------------------------------------

    def _forgotten(self, name: str) -> None:
        if self.on_forget is not None:
            self.on_forget(name)

    def reap(self, now: float | None = None) -> list[str]:
        """Forget dynamic models with nothing left running, nobody waiting and no failure to
        show: their routes (so they leave ``/v1/models``), groups and controllers."""
        del now  # the decision reads only published state
        gone = []
        for name in [*self.leaving, *self.dynamic]:
            g = self.pool.groups.get(name)
            if name in self.after:
                continue  # not launched yet: its controller runs once the victim is gone
            if g is not None and (
                any(r.state not in TERMINAL for r in g.replicas)
                or g.demand_at is not None
                or g.waiters > 0
                or g.inflight() > 0
                or (g.failed_now() and name in self.dynamic)
            ):
                continue
            self.routes.remove(name)
            self._forgotten(name)
            self.dynamic.pop(name, None)
            self.leaving.pop(name, None)
            self.pool.remove_model(name)
            gone.append(name)
        for name in gone:
            log.info("model %s stopped and forgotten", name)
        for name, victim in list(self.after.items()):
            if victim not in self.pool.groups:
                del self.after[name]
                self.pool.control.run_group(name)
        return gone

    async def run(self) -> None:
        """The control-plane task: reap every ``interval_s`` until cancelled."""
        while True:
            try:
                self.reap(time.monotonic())
            except Exception:
                log.exception("forgetting stopped dynamic models failed")
            await asyncio.sleep(self.interval_s)
