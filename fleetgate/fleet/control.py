"""The fleet's control plane: launchers, one controller per model, and up/down/status requests.

:class:`Fleet` builds a launcher per backend type (from the registry in
:mod:`fleetgate.fleet.launchers`, resolved once) and a
:class:`~fleetgate.fleet.controller.Controller` per model, over the
:class:`~fleetgate.fleet.group.ModelGroup` objects that the routing table
(:class:`~fleetgate.fleet.pool.Pool`) shares with it. The data plane never calls anything here.

:meth:`Fleet.start` first settles what a previous gateway run left behind (adopt or stop, per
``fleet.on_leftover``), then starts the controllers. :meth:`Fleet.stop` stops the replicas this
gateway runs, except those whose backend says ``keep_on_shutdown``. ``up``, ``down`` and
``model_status`` never wait: they ask the controller and answer at once. Nothing here knows a
backend type by name.

Models may come and go at run time (started from a template, see
:mod:`fleetgate.fleet.templates`): :meth:`Fleet.add_group` gives a new group its controller
(running at once if the fleet runs), :meth:`Fleet.remove_group` cancels it once its replicas
are gone. A leftover replica of a model that isn't configured is offered to :attr:`Fleet.adopter`
first, which may rebuild its group from a template so the replica is adopted, not stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fleetgate.config import Settings
from fleetgate.fleet.controller import Controller
from fleetgate.fleet.group import ModelGroup
from fleetgate.fleet.health import Prober
from fleetgate.fleet.launchers import LAUNCHERS, AcceptsCallbacks, Launcher
from fleetgate.fleet.launchers.base import config_digest
from fleetgate.proxy.client import tls_context

log = logging.getLogger("fleetgate.fleet")


class Fleet:
    def __init__(
        self,
        settings: Settings,
        groups: dict[str, ModelGroup],
        launchers: dict[str, Launcher] | None = None,
    ) -> None:
        self.settings = settings
        self.fleet = settings.fleet
        self.groups = groups
        self.prober = Prober(self.fleet.probe_timeout_s, tls_context(settings.server))
        self.launchers: dict[str, Launcher] = dict(launchers or {})
        for kind, make in LAUNCHERS.items():
            # Every type, used or not: leftovers of a model since removed are settled too.
            self.launchers.setdefault(kind, make(self.fleet))
        self.controllers: dict[str, Controller] = {}
        for g in groups.values():
            self._control(g)
        self._tasks: list[asyncio.Task[None]] = []
        self._task_of: dict[str, asyncio.Task[None]] = {}
        self._looping = False
        self.started = False
        # A model name -> its group rebuilt (from a template), for a leftover replica of a
        # model that isn't configured; None: such leftovers are stopped.
        self.adopter: Callable[[str], ModelGroup | None] | None = None

    def _control(self, g: ModelGroup) -> Controller:
        launcher = self.launchers[g.backend_type]
        g.passive = not launcher.manages_processes
        c = self.controllers[g.name] = Controller(g, launcher, self.fleet, self.prober)
        return c

    def _run(self, name: str, c: Controller) -> None:
        c.step()  # static URLs are routable when start() returns
        task = asyncio.get_running_loop().create_task(c.run(), name=f"controller {name}")
        self._tasks.append(task)
        self._task_of[name] = task

    # --- models added and removed at run time ----------------------------------------------

    def add_group(self, g: ModelGroup, run: bool = True) -> Controller:
        """Control a new model's group; its controller runs at once if the fleet runs and
        ``run`` is set, else at :meth:`run_group` (demand raised meanwhile is kept)."""
        self.groups[g.name] = g
        c = self._control(g)
        if run:
            self.run_group(g.name)
        return c

    def run_group(self, name: str) -> None:
        c = self.controllers.get(name)
        if self._looping and c is not None and name not in self._task_of:
            self._run(name, c)

    def remove_group(self, name: str) -> None:
        """Forget a model whose replicas are all gone: its controller stops, its group goes."""
        task = self._task_of.pop(name, None)
        c = self.controllers.pop(name, None)
        if c is not None:
            c.closed = True
        if task is not None:
            task.cancel()
            self._tasks.remove(task)
        self.groups.pop(name, None)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.started:
            return
        self.started = True
        await self._settle_leftovers()
        for name, c in list(self.controllers.items()):
            self._run(name, c)
        self._looping = True

    async def _settle_leftovers(self) -> None:
        for kind, launcher in self.launchers.items():
            try:
                handles = await launcher.adopt()
            except Exception:
                log.exception("%s launcher: finding leftover replicas failed", kind)
                continue
            for h in handles:
                g = self.groups.get(h.model)
                if g is None and self.adopter is not None:
                    try:
                        g = self.adopter(h.model)
                    except Exception:
                        log.exception("rebuilding %s from a template failed", h.model[:200])
                why = ""
                if self.fleet.on_leftover != "adopt":
                    why = "fleet.on_leftover is 'stop'"
                elif g is None:
                    why = "model no longer configured"
                elif g.backend_type != kind or h.info.get("digest") != config_digest(
                    g.name, g.settings.backend
                ):
                    why = "backend config changed"
                if why:
                    log.warning(
                        "stopping leftover replica %s of %s: %s", h.replica_id, h.model, why
                    )
                    try:
                        await launcher.stop(h)
                    except Exception:
                        log.exception("could not stop leftover replica %s", h.replica_id)
                else:
                    log.info("adopting leftover replica %s of %s", h.replica_id, h.model)
                    self.controllers[h.model].adopt(h)

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop control loops, then stop (drain) launched replicas; bounded by ``timeout_s``."""
        self._looping = False
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks.clear()
        self._task_of.clear()
        jobs = []
        for name, c in self.controllers.items():
            g = self.groups[name]
            life = g.settings.backend.lifecycle()
            limit = timeout_s
            if limit is None:
                limit = g.policy.scaling.drain_timeout_s + life.stop_grace_s + 5.0
            jobs.append(c.shutdown(life.keep_on_shutdown, limit))
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)
        for launcher in self.launchers.values():
            try:
                await launcher.aclose()
            except Exception:
                log.exception("closing a launcher failed")
        await self.prober.close()
        self.started = False

    # --- control-plane requests (fleet API) ------------------------------------------------

    def up(self, model: str) -> str:
        """Ask for the model to run; answers ``pending``, ``starting`` or ``healthy``."""
        g = self.groups[model]
        g.held_down = False
        g.clear_failed()
        if not g.routable:
            g.demand()
        return g.status()

    def down(self, model: str) -> str:
        """Drain and stop every replica; nothing restarts until new demand or ``up``."""
        g = self.groups[model]
        if g.passive:
            return g.status()
        g.held_down = True
        g.demand_at = None
        self.controllers[model].stop_all("fleet down")
        g.wake.set()
        return g.status()

    def accept_callback(self, replica_id: str, token: str, host: str, port: int) -> str | None:
        """A job reporting its address (``POST /v1/fleet/callback``): None if accepted."""
        why = "no launcher takes callbacks"
        for launcher in self.launchers.values():
            if isinstance(launcher, AcceptsCallbacks):
                why = launcher.accept_callback(replica_id, token, host, port) or ""
                if not why:
                    return None
        return why
