"""The web portal (``/portal/``): sign-in (LDAP or local), keys, models, usage and example code.

Server-rendered Jinja2 pages on the gateway's own router; see :mod:`fleetgate.portal.routes`
and docs/portal.md. Nothing here is on the ``/v1/*`` request path.
"""
