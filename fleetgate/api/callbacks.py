"""``POST /v1/fleet/callback``: a launched job reports where its engine listens.

A public route as far as API keys go: it authenticates by the one-time token the launcher
minted for that job (:class:`~fleetgate.fleet.launchers.base.AcceptsCallbacks`). The body is
small and bounded: ``{"replica", "token", "host", "port"}`` (a ``job_id`` is allowed and
ignored). Any refusal (unknown replica, wrong token, a replay, a bad host) gets the same 403,
so a caller learns nothing; the reason goes to the gateway log. Accepting does not make the
replica routable: the supervisor still probes ``/health`` and ``/v1/models`` itself.
"""

from __future__ import annotations

import logging

from fleetgate.api.asgi import send_json
from fleetgate.api.fleet import json_body
from fleetgate.api.routing import Request, Route
from fleetgate.errors import InvalidRequest, PermissionDenied
from fleetgate.fleet.control import Fleet
from fleetgate.fleet.launchers.base import CALLBACK_PATH

log = logging.getLogger("fleetgate.fleet")

_BODY_LIMIT = 4096


class CallbackRoutes:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    async def callback(self, req: Request) -> None:
        doc = await json_body(req, _BODY_LIMIT)
        if not isinstance(doc, dict):
            raise InvalidRequest("The body must be a JSON object.")
        replica, token, host, port = (doc.get(k) for k in ("replica", "token", "host", "port"))
        if not (
            isinstance(replica, str)
            and isinstance(token, str)
            and isinstance(host, str)
            and isinstance(port, int)
            and not isinstance(port, bool)
            and 0 < len(replica) <= 300
            and 0 < len(token) <= 300
            and 0 < len(host) <= 253
        ):
            raise InvalidRequest(
                "Expected {\"replica\": str, \"token\": str, \"host\": str, \"port\": int}."
            )
        why = self.fleet.accept_callback(replica, token, host, port)
        if why is not None:
            log.warning("refused a job callback for replica %r: %s", replica[:100], why)
            raise PermissionDenied("Callback refused.", code="callback_refused")
        await send_json(req.send, 200, {"status": "accepted"})

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST", CALLBACK_PATH, self.callback, "public",
                "A launched job reports its engine's address (one-time token).",
            )
        ]
