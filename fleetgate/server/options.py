"""What the HTTP server needs to know, as one frozen dataclass free of the config module.

The server package is a generic ASGI server: it knows nothing of FleetGate's settings file.
``fleetgate serve`` maps ``server.*`` settings onto :class:`ServerOptions` (see
``fleetgate/cli/serve.py``), and tests build one directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TlsOptions:
    cert_file: str
    key_file: str
    # When set, every client must present a certificate signed by one of these CAs (mutual TLS).
    client_ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    # Request line plus every header line; past it, 431.
    max_header_bytes: int = 32 * 1024
    # Header lines; past it, 431.
    max_headers: int = 100
    # The whole request head must arrive within this, counted from its first byte (or, on a
    # new connection, from the accept); past it the connection is cut, with 408 if part of a
    # head had arrived.
    header_timeout_s: float = 10.0
    # A request body arriving more slowly than this, on average, once it has been arriving for
    # header_timeout_s, is cut with 408. Time the server itself stops reading (because the app
    # isn't reading yet) doesn't count.
    body_min_rate_bytes_s: float = 1024.0
    # An idle keep-alive connection is closed after this.
    keepalive_timeout_s: float = 20.0
    # Open connections per process; a connection past it gets 503 at once and is closed.
    max_connections: int = 10_000
    # Content-Length above this is refused with 413 before the app runs (None: no check here).
    max_body_bytes: int | None = None
    # On SIGTERM/SIGINT: how long in-flight requests may finish before their connections are cut.
    shutdown_grace_s: float = 30.0
    access_log: bool = False
    tls: TlsOptions | None = None
    # Set SO_REUSEPORT on the listening socket, so several worker processes can each bind it.
    reuse_port: bool = False
