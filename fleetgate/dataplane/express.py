"""The express door: where FleetGate's own server offers an OpenAI request before any task.

The server (:mod:`fleetgate.server.protocol`) hands :meth:`ExpressDoor.offer` each request to one
of the express paths whose body is in. A request whose key is in the cache, fresh, valid and not
fenced to networks runs the pipeline at once (:meth:`Pipeline.express`); anything else (no key, a
key to load, a refused or fenced key) is declined and goes to the router as usual, which decides
it with the same rules. It lives here, not on the ASGI app, so that it is compiled with the rest
of the request path (``setup.py``'s ``COMPILED``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fleetgate.api.asgi import Scope, Send, header
from fleetgate.api.exchange import NativeExchange
from fleetgate.auth.authn import Authenticator
from fleetgate.dataplane.pipeline import Pipeline
from fleetgate.dataplane.request import Endpoint
from fleetgate.errors import GatewayError

# The app's error answer (the router's, so a refused express request reads the same).
AnswerError = Callable[[Scope, Send, GatewayError], Coroutine[Any, Any, None]]


class ExpressDoor:
    def __init__(self, authn: Authenticator, pipeline: Pipeline, endpoints: dict[str, Endpoint],
                 answer_error: AnswerError) -> None:
        self.authn = authn
        self.pipeline = pipeline
        self.endpoints = endpoints
        self.answer_error = answer_error

    def offer(self, c: NativeExchange) -> bool:
        """Take the request (True), or decline it to the router (False)."""
        scope = c.scope
        principal = self.authn.cached(header(scope, b"authorization"))
        if principal is None or principal.networks.restricted:
            return False
        try:
            self.pipeline.express(self.endpoints[scope["path"]], principal, c)
        except GatewayError as e:
            c.resume(self.answer_error(scope, c.send, e))  # as the router's would be
        return True
