"""The container's health check: exit 0 if the gateway's ``GET /health`` answers 200, else 1.

Standard library only (the slim image has no curl), and bounded: one request, a 4 s timeout.
``FLEETGATE_HEALTH_URL`` overrides the URL (default ``http://127.0.0.1:8000/health``). An
``https://`` URL is checked without certificate verification: it is the container's own
loopback, and the gateway's certificate names its public host, not 127.0.0.1.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/health"


def healthy(url: str, timeout_s: float = 4.0) -> bool:
    ctx = ssl._create_unverified_context() if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=ctx) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def main() -> int:
    url = os.environ.get("FLEETGATE_HEALTH_URL") or DEFAULT_URL
    ok = healthy(url)
    if not ok:
        print(f"unhealthy: GET {url} did not answer 200", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
