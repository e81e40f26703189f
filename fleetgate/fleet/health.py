"""HTTP probes of a replica: ``GET /health`` then, for readiness, ``GET /v1/models``.

Used by the supervisors only (control plane). One shared ``aiohttp`` session, short timeouts,
no retries: the caller polls. A probe never raises; it answers ``(ok, why_not)``.
"""

from __future__ import annotations

import ssl

import aiohttp


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
        ok, why = await self.get(base + health_path)
        if ok and models_path:
            ok, why = await self.get(base + models_path, headers)
        return ok, why

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
