"""OpenAI wire shapes: parsing the few request fields the simulator obeys, rendering responses.

Parsing is lenient like vLLM's ``extra="allow"`` models: unknown fields are ignored, and only
``model``, ``messages``/``prompt``/``input``, ``max_tokens``/``max_completion_tokens``, ``n``,
``stream``, ``stream_options.include_usage``, ``encoding_format`` and ``dimensions`` are read.
A field the simulator reads but cannot use raises :class:`SimError` (rendered as a 400).

Rendering aims at "the official ``openai`` client parses it, and it looks like vLLM": the same
object names, ``finish_reason`` values and usage fields. Stream chunks are assembled from bytes
prepared once per request (:class:`StreamShapes`), so a token chunk is one concatenation.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from fleetgate.sim import synth
from fleetgate.sim.options import DEFAULT_MAX_TOKENS, MAX_N, MAX_TOKENS_CAP

Kind = Literal["chat", "completion"]

DONE = b"data: [DONE]\n\n"

# Response ids: a per-process random prefix plus a counter is unique and costs no syscall.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{_ID_PREFIX}{next(_ID_COUNTER):x}"


class SimError(Exception):
    """A request the simulator refuses, rendered as vLLM's OpenAI-shaped error."""

    def __init__(
        self, status: int, message: str, *, type: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "BadRequestError")
        self.param = param

    def to_bytes(self) -> bytes:
        return error_body(self.status, self.message, type=self.type, param=self.param)


_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "BadRequestError",
}


def error_body(status: int, message: str, *, type: str, param: str | None = None) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}`` with the HTTP status as ``code``."""
    return orjson.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": status}}
    )


@dataclass(frozen=True, slots=True)
class GenRequest:
    """What one chat or completions request asks the simulator to produce."""

    kind: Kind
    model: str
    tokens: int
    """Tokens per choice."""
    finish_reason: str
    choices: int
    """Number of choices: ``n`` times the number of prompts (completions may batch prompts)."""
    prompt_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool = False
    """vLLM's ``stream_options.continuous_usage_stats`` (with ``include_usage``): every chunk
    carries ``usage``, its ``completion_tokens`` being that choice's tokens so far."""

    @property
    def completion_tokens(self) -> int:
        return self.tokens * self.choices


def _int_field(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise SimError(400, f"{name} must be an integer", param=name)
    return v


def parse_generation(kind: Kind, body: dict[str, Any]) -> GenRequest:
    """Read a chat (``kind="chat"``) or completions request body. Raises :class:`SimError`."""
    model = body["model"]  # checked by the caller before routing here
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise SimError(400, "messages must be a non-empty list", param="messages")
        prompt_tokens = synth.count_message_tokens(messages)
        prompts = 1
    else:
        items = synth.split_prompts(body.get("prompt"))
        if items is None:
            raise SimError(
                400, "prompt must be a string, a list of strings or token ids", param="prompt"
            )
        prompt_tokens = sum(synth.count_item_tokens(i) for i in items)
        prompts = len(items)

    asked = _int_field(body, "max_completion_tokens")
    if asked is None:
        asked = _int_field(body, "max_tokens")
    if asked is None:
        tokens, finish = DEFAULT_MAX_TOKENS, "stop"
    elif asked < 1:
        raise SimError(400, "max_tokens must be at least 1", param="max_tokens")
    else:
        tokens, finish = min(asked, MAX_TOKENS_CAP), "length"

    n = _int_field(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise SimError(400, f"n must be between 1 and {MAX_N}", param="n")

    stream = body.get("stream") is True
    opts = body.get("stream_options")
    include_usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True
    continuous = (
        include_usage and isinstance(opts, dict) and opts.get("continuous_usage_stats") is True
    )
    return GenRequest(
        kind, model, tokens, finish, n * prompts, prompt_tokens, stream, include_usage, continuous
    )


def _usage(req: GenRequest) -> dict[str, int]:
    return {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": req.completion_tokens,
        "total_tokens": req.prompt_tokens + req.completion_tokens,
    }


def full_response(req: GenRequest, created: int) -> bytes:
    """The non-streaming ``chat.completion`` or ``text_completion`` body."""
    text = synth.completion_text(req.tokens)
    choices: list[dict[str, Any]]
    if req.kind == "chat":
        rid, obj = new_id("chatcmpl"), "chat.completion"
        choices = [
            {
                "index": j,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": req.finish_reason,
                "stop_reason": None,
            }
            for j in range(req.choices)
        ]
    else:
        rid, obj = new_id("cmpl"), "text_completion"
        choices = [
            {
                "index": j,
                "text": text,
                "logprobs": None,
                "finish_reason": req.finish_reason,
                "stop_reason": None,
            }
            for j in range(req.choices)
        ]
    return orjson.dumps(
        {
            "id": rid,
            "object": obj,
            "created": created,
            "model": req.model,
            "choices": choices,
            "usage": _usage(req),
        }
    )


class StreamShapes:
    """The SSE events of one streamed request, from bytes prepared when it starts.

    Every event is ``data: {json}\\n\\n``. The chat order is: a role chunk per choice (delta
    ``{"role": "assistant", "content": ""}``), one chunk per token per choice, a final chunk per
    choice with ``finish_reason``, the usage chunk (``"choices": []``) when asked, ``[DONE]``.
    Completions have no role chunk.
    """

    __slots__ = ("_head", "_chat", "_req")

    def __init__(self, req: GenRequest, created: int) -> None:
        self._req = req
        self._chat = req.kind == "chat"
        rid, obj = (
            (new_id("chatcmpl"), b"chat.completion.chunk")
            if self._chat
            else (new_id("cmpl"), b"text_completion")
        )
        self._head = b"".join(
            (
                b'data: {"id":',
                orjson.dumps(rid),
                b',"object":"',
                obj,
                b'","created":%d,"model":' % created,
                orjson.dumps(req.model),
                b',"choices":[',
            )
        )

    def role(self, j: int) -> bytes:
        if not self._chat:
            return b""
        return self._head + (
            b'{"index":%d,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]}\n\n' % j
        )

    def token(self, j: int, i: int) -> bytes:
        piece = synth.PIECES_JSON[i]
        if self._chat:
            mid = b'{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            mid = b'{"index":%d,"text":%s,"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
        return self._head + mid % (j, piece)

    def final(self, j: int) -> bytes:
        reason = self._req.finish_reason.encode()
        if self._chat:
            mid = b'{"index":%d,"delta":{},"logprobs":null,"finish_reason":"%s","stop_reason":null}]}\n\n'
        else:
            mid = b'{"index":%d,"text":"","logprobs":null,"finish_reason":"%s","stop_reason":null}]}\n\n'
        return self._head + mid % (j, reason)

    def usage(self) -> bytes:
        return self._head + b'],"usage":' + orjson.dumps(_usage(self._req)) + b"}\n\n"

    def with_usage(self, event: bytes, completion_tokens: int) -> bytes:
        """``event`` with vLLM's continuous usage as its last member (before ``}\\n\\n``)."""
        p = self._req.prompt_tokens
        return event[:-3] + (
            b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n'
            % (p, p + completion_tokens, completion_tokens)
        )


def parse_embedding(body: dict[str, Any], default_dim: int) -> tuple[list[Any], int, bool]:
    """Read an embeddings body: ``(items, dim, as_base64)``. Raises :class:`SimError`."""
    items = synth.split_prompts(body.get("input"))
    if items is None:
        raise SimError(400, "input must be a string, a list of strings or token ids", param="input")
    dim = _int_field(body, "dimensions")
    if dim is None:
        dim = default_dim
    elif not 1 <= dim <= 65536:
        raise SimError(400, "dimensions must be between 1 and 65536", param="dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise SimError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    return items, dim, fmt == "base64"


def embedding_response(
    model: str, items: list[Any], dim: int, as_base64: bool, created: int
) -> bytes:
    """The ``list`` of ``embedding`` objects, with usage, for ``items``."""
    data: list[dict[str, Any]] = []
    for idx, item in enumerate(items):
        vec = synth.embed(item, dim)
        data.append(
            {
                "object": "embedding",
                "index": idx,
                "embedding": synth.embedding_base64(vec) if as_base64 else vec,
            }
        )
    prompt_tokens = sum(synth.count_item_tokens(i) for i in items)
    return orjson.dumps(
        {
            "id": new_id("embd"),
            "object": "list",
            "created": created,
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def models_response(models: tuple[str, ...], created: int, max_model_len: int) -> bytes:
    """``GET /v1/models``: every served name, shaped like vLLM's list."""
    root = models[0]
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": m,
                    "object": "model",
                    "created": created,
                    "owned_by": "fleetgate-sim",
                    "root": root,
                    "parent": None,
                    "max_model_len": max_model_len,
                }
                for m in models
            ],
        }
    )
