"""Reading a request body: only what the gateway routes and polices on, nothing more.

:func:`parse` reads ``model``, ``stream``, ``stream_options``, ``max_tokens``,
``max_completion_tokens`` and ``n`` with orjson, once. Everything else in the body is left alone
and forwarded byte for byte. :func:`upstream_body` re-serialises only when the gateway must
change something: the model's upstream name, or the stream options that make every token
countable. Both are pure functions: no I/O, no clock.

The values vLLM would read leniently are read here the same way, so that a client can't make the
gateway and the engine disagree (``"include_usage": "false"`` is false to both), and the
gateway always sends the engine literal values it reads the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from fleetgate.errors import InvalidRequest

# pydantic's lax booleans, which vLLM's request models use.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One OpenAI route: its constant upstream path and its name in usage records."""

    path: str
    name: str
    streams: bool  # whether ``stream: true`` is allowed


CHAT = Endpoint("/v1/chat/completions", "chat.completions", True)
COMPLETIONS = Endpoint("/v1/completions", "completions", True)
EMBEDDINGS = Endpoint("/v1/embeddings", "embeddings", False)
ENDPOINTS: tuple[Endpoint, ...] = (CHAT, COMPLETIONS, EMBEDDINGS)


class ParsedRequest:
    """What the gateway reads of a request body. Built once per request, so a plain class: its
    ``__init__`` is compiled with the module, where a dataclass's is generated Python."""

    __slots__ = ("model", "stream", "include_usage", "continuous_usage", "max_tokens", "n",
                 "size", "generates", "doc")

    def __init__(self, model: str, stream: bool, include_usage: bool, continuous_usage: bool,
                 max_tokens: int | None, n: int, size: int, generates: bool,
                 doc: dict[str, Any]) -> None:
        self.model = model
        self.stream = stream
        self.include_usage = include_usage  # the client asked for streamed usage itself
        self.continuous_usage = continuous_usage  # ... and for it on every chunk
        self.max_tokens = max_tokens  # max_completion_tokens, else max_tokens, else None
        self.n = n
        self.size = size  # body bytes, for admission's prompt estimate
        self.generates = generates  # produces completion tokens (not embeddings)
        self.doc = doc

    def __repr__(self) -> str:
        return (f"ParsedRequest(model={self.model!r}, stream={self.stream}, "
                f"max_tokens={self.max_tokens}, n={self.n}, size={self.size})")


def lax_bool(value: object, name: str) -> bool:
    """A boolean as pydantic's lax mode reads it; anything else is a 400."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise InvalidRequest(f"'{name}' must be a boolean.", param=name)


def _int_field(doc: dict[str, Any], name: str, minimum: int) -> int | None:
    v = doc.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise InvalidRequest(f"'{name}' must be an integer >= {minimum}.", param=name)
    return v


def parse(raw: bytes, endpoint: Endpoint) -> ParsedRequest:
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "You must provide a model parameter.", param="model", code="missing_model"
        )
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        # Strict, unlike the usage flags below: refusing is as safe as agreeing with vLLM.
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    if stream and not endpoint.streams:
        raise InvalidRequest("This endpoint can't be streamed.", param="stream")
    opts = doc.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    include_usage = continuous = False
    if opts:
        iu = opts.get("include_usage")
        include_usage = iu is not None and lax_bool(iu, "stream_options.include_usage")
        cu = opts.get("continuous_usage_stats")
        continuous = cu is not None and lax_bool(cu, "stream_options.continuous_usage_stats")
    max_tokens = _int_field(doc, "max_tokens", 0)
    max_completion = _int_field(doc, "max_completion_tokens", 0)
    n = _int_field(doc, "n", 1)
    return ParsedRequest(
        model=model,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        max_tokens=max_completion if max_completion is not None else max_tokens,
        n=1 if n is None else n,
        size=len(raw),
        generates=endpoint.streams,
        doc=doc,
    )


class UpstreamBody:
    """The bytes to send upstream, and what the relay must hide of what the gateway added (a
    plain class, as :class:`ParsedRequest`)."""

    __slots__ = ("body", "hide_usage_event", "strip_chunk_usage")

    def __init__(self, body: bytes, hide_usage_event: bool, strip_chunk_usage: bool) -> None:
        self.body = body
        # the gateway asked for the final usage event; the client didn't
        self.hide_usage_event = hide_usage_event
        # the gateway asked for usage on every chunk; the client didn't
        self.strip_chunk_usage = strip_chunk_usage


def upstream_body(
    raw: bytes, req: ParsedRequest, upstream_name: str, priority: int | None = None
) -> UpstreamBody:
    """The bytes to send upstream, and what the relay must hide of what the gateway added.

    A stream always asks the engine for ``include_usage`` and ``continuous_usage_stats`` as
    literal ``true``: the first so the final count arrives, the second so that a client that
    leaves mid-stream is still charged for what the engine generated. ``priority`` (fair share's
    ``pass_priority``) replaces whatever the client sent: a client can't raise its own.
    """
    changed = False
    if priority is not None:
        req.doc["priority"] = priority
        changed = True
    if upstream_name != req.model:
        req.doc["model"] = upstream_name
        changed = True
    if req.stream:
        opts = dict(req.doc.get("stream_options") or {})
        if opts.get("include_usage") is not True or opts.get("continuous_usage_stats") is not True:
            opts["include_usage"] = True
            opts["continuous_usage_stats"] = True
            req.doc["stream_options"] = opts
            changed = True
    body = raw
    if changed:
        try:
            body = orjson.dumps(req.doc)
        except (orjson.JSONEncodeError, RecursionError):
            # orjson reads deeper documents than it writes (1024 vs 254 levels).
            raise InvalidRequest(
                "The request body is nested too deeply.", code="invalid_json"
            ) from None
    return UpstreamBody(
        body,
        hide_usage_event=req.stream and not req.include_usage,
        strip_chunk_usage=req.stream and not (req.include_usage and req.continuous_usage),
    )
