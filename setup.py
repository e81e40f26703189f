"""Everything about the package is in pyproject.toml; this file only adds the compiled build.

``FLEETGATE_USE_MYPYC=1`` compiles the request path's modules (:data:`COMPILED`) to C extensions
with mypyc, as black and mypy ship theirs; the Python source stays the source of truth and a
module without its extension runs as Python. Unset, the install is pure Python::

    pip install mypy==2.4.1 wheel     # the build needs them, and a C compiler
    FLEETGATE_USE_MYPYC=1 pip install --no-build-isolation .
    bash scripts/compiled.sh DIR                                # a compiled copy of this checkout

See docs/server.md ("The compiled build") for what it changes and what it costs.
"""

import os

from setuptools import setup

COMPILED = [
    "fleetgate/server/protocol.py",
    "fleetgate/server/wire.py",
    "fleetgate/dataplane/pipeline.py",
    "fleetgate/dataplane/request.py",
    "fleetgate/dataplane/admission.py",
    "fleetgate/limits/backend.py",
    "fleetgate/limits/memory.py",
    "fleetgate/limits/headers.py",
    "fleetgate/proxy/client.py",
    "fleetgate/proxy/relay.py",
    "fleetgate/proxy/usage_tap.py",
    "fleetgate/fleet/pool.py",
    "fleetgate/auth/keys.py",
    "fleetgate/auth/networks.py",
    "fleetgate/auth/principals.py",
    "fleetgate/auth/authn.py",
    "fleetgate/dataplane/routes.py",
    "fleetgate/dataplane/express.py",
    "fleetgate/limits/buckets.py",
    "fleetgate/limits/redis_backend.py",
    "fleetgate/limits/resp.py",
    "fleetgate/limits/quotas.py",
    "fleetgate/api/asgi.py",
    "fleetgate/store/usage_rows.py",
]

if os.environ.get("FLEETGATE_USE_MYPYC") == "1":
    from mypyc.build import mypycify

    setup(ext_modules=mypycify(COMPILED, opt_level="3"))
else:
    setup()
