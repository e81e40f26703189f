"""FleetGate's own HTTP/1.1 server: uvloop + httptools as a raw ``asyncio.Protocol``, running any
ASGI 3 app (the gateway, unchanged), with bounded heads, timeouts against slow clients, a
connection cap, native TLS and graceful shutdown. See ``docs/server.md``.

- :mod:`.options`: the settings it takes (no dependency on the config file);
- :mod:`.wire`: status lines, the cached ``Date`` header, the server's own refusals;
- :mod:`.protocol`: one connection (parsing, pipelining, flow control, the ASGI cycle);
- :mod:`.server`: listening, TLS, lifespan, the time-limit sweep, graceful shutdown, ``run``;
- :mod:`.workers`: ``--workers N``: N processes on one port (``SO_REUSEPORT``) and a parent
  that stops them all.
"""

from fleetgate.server.options import ServerOptions, TlsOptions
from fleetgate.server.server import Server, run

__all__ = ["Server", "ServerOptions", "TlsOptions", "run"]
