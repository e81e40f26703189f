"""HTTP probes of a replica: ``GET /health`` then, for readiness, ``GET /v1/models`` (whose
``max_model_len`` is the model's context length, shown in the status and the portal).

Used by the supervisors only (control plane). One shared ``aiohttp`` session, short timeouts,
no retries: the caller polls. A probe never raises; it answers ``(ok, why_not)``.
"""

from __future__ import annotations

import ssl

import aiohttp
import orjson

_MODELS_LIMIT = 1 << 20


class Prober:
    def __init__(self, timeout_s: float = 2.0, tls: ssl.SSLContext | None = None) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        # https:// replicas are checked as the relay checks them (server.upstream_tls).
        self.tls: ssl.SSLContext | bool = tls if tls is not None else True
        self._session: aiohttp.ClientSession | None = None

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout,
                connector=aiohttp.TCPConnector(limit=64, force_close=True, ssl=self.tls),
                headers={"user-agent": "fleetgate-probe"},
            )
        return self._session

    async def get(self, url: str, headers: dict[str, str] | None = None) -> tuple[bool, str]:
        try:
            async with self._s().get(url, headers=headers, allow_redirects=False) as r:
                await r.read()
                if r.status == 200:
                    return True, ""
                return False, f"{url} answered {r.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            return False, f"{url}: {type(e).__name__}: {e}".rstrip(": ")

    async def check(
        self,
        base: str,
        health_path: str,
        models_path: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[bool, str]:
        ok, why, _ = await self.check_ready(base, health_path, models_path, headers)
        return ok, why

    async def check_ready(
        self,
        base: str,
        health_path: str,
        models_path: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[bool, str, int | None]:
        """``check``, plus the context length the engine reports in ``/v1/models``
        (vLLM's ``max_model_len``), when it says one."""
        ok, why = await self.get(base + health_path)
        if not (ok and models_path):
            return ok, why, None
        url = base + models_path
        try:
            async with self._s().get(url, headers=headers, allow_redirects=False) as r:
                if r.status != 200:
                    return False, f"{url} answered {r.status}", None
                body = b""
                while len(body) <= _MODELS_LIMIT:  # a model list: small, and bounded
                    part = await r.content.read(65536)
                    if not part:
                        break
                    body += part
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            return False, f"{url}: {type(e).__name__}: {e}".rstrip(": "), None
        return True, "", context_length(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def context_length(body: bytes) -> int | None:
    """The largest ``max_model_len`` in an OpenAI ``/v1/models`` answer; None if none."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    lens = [
        m["max_model_len"] for m in data or () if isinstance(m, dict)
        and isinstance(m.get("max_model_len"), int) and not isinstance(m["max_model_len"], bool)
        and m["max_model_len"] > 0
    ] if isinstance(data, list) else []
    return max(lens) if lens else None
