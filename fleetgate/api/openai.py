"""The OpenAI-compatible routes, thin: each hands its request to the data-plane pipeline.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` need a key and run
:meth:`fleetgate.dataplane.pipeline.Pipeline.handle`; ``/v1/models`` lists the models the caller
may use (everyone's, unauthenticated, when ``server.public_models_list`` is on and no key is
sent).
"""

from __future__ import annotations

from fleetgate.api.asgi import send_json
from fleetgate.api.exchange import exchange
from fleetgate.api.routing import Handler, Request, Route
from fleetgate.dataplane.pipeline import Pipeline
from fleetgate.dataplane.request import ENDPOINTS, Endpoint


class OpenAIRoutes:
    def __init__(self, pipeline: Pipeline, *, public_models_list: bool) -> None:
        self.pipeline = pipeline
        self.public_models_list = public_models_list

    def _endpoint(self, endpoint: Endpoint) -> Handler:
        handle = self.pipeline.handle

        async def handler(req: Request) -> None:
            await handle(endpoint, req.caller, exchange(req.scope, req.receive, req.send))

        return handler

    async def list_models(self, req: Request) -> None:
        p = req.principal
        data = [r.entry for r in self.pipeline.routes if p is None or p.allows(r.name)]
        await send_json(req.send, 200, {"object": "list", "data": data})

    def routes(self) -> list[Route]:
        return [
            Route(
                "GET",
                "/v1/models",
                self.list_models,
                "optional" if self.public_models_list else "key",
                "The models the caller may use.",
            ),
            *(
                Route("POST", e.path, self._endpoint(e), "key", f"OpenAI {e.name}, relayed.")
                for e in ENDPOINTS
            ),
        ]
