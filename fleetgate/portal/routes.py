"""The portal's routes: HTML pages under ``/portal/``, each checking its own session.

The dispatcher sees every route here as ``public`` (a browser sends a cookie, not a key); each
handler goes through :meth:`PortalRoutes._page`, which finds the session (a worker thread: the
store blocks), turns it into a key-less :class:`~fleetgate.auth.principals.Principal`, checks the
CSRF token of every form (``csrf_token``, constant time) and refuses admin pages to a ``user``
(403, audited). What anyone may do is then asked of :mod:`fleetgate.services.authz` and done by
the same services the CLI and the admin API call; fleet ``up``/``down`` go through the fleet
API's own handlers, so the portal holds no policy of its own.

Creating and rotating a key answer 303 to ``GET /portal/keys?created=ID`` (``rotated=ID``),
which shows the new value once (:mod:`fleetgate.portal.once`: kept in memory for that session,
never in a URL); a reload shows the list and says the value was shown once, and a form posted
twice (its one-time ``form_token``) does its work once.

Errors are HTML pages with the status the API would give; a missing or expired session is a 303
to the sign-in page (a 401 page for a form post). Every answer carries a strict CSP (no inline
script or style), ``no-store`` and ``nosniff``. Nothing here touches the ``/v1/*`` path.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

import jinja2
from sqlalchemy import Engine

from fleetgate.api.asgi import Scope, Send, read_body
from fleetgate.api.routing import Request, Route
from fleetgate.auth import keys as keyfmt
from fleetgate.auth import sessions
from fleetgate.auth.ldap import Directory, LdapRefused, LdapUnavailable, valid_username
from fleetgate.auth.networks import client_address, parse_networks
from fleetgate.auth.principals import Principal
from fleetgate.config import Settings
from fleetgate.errors import AuthError, GatewayError, InvalidRequest, PermissionDenied
from fleetgate.fleet import api_handlers as fleet_api
from fleetgate.fleet.pool import Pool
from fleetgate.portal import chart, once
from fleetgate.portal.ratelimit import SigninLimiter
from fleetgate.services import Actor, Context, audit, authz, usage_report
from fleetgate.services import accounts as account_svc
from fleetgate.services import groups as group_svc
from fleetgate.services import keys as key_svc
from fleetgate.services import users as user_svc

log = logging.getLogger("fleetgate.portal")

P = "/portal"
FORM_LIMIT = 16 * 1024
GENERIC_REFUSAL = "The user name or password is not right."
EXPIRY_CHOICES = (("30d", "30 days"), ("90d", "90 days"), ("365d", "1 year"), ("", "Never"))
# What a model's fleet status means to someone who wants to use it.
STATE_WORDS = {"healthy": "running", "starting": "starting", "pending": "starting",
               "failed": "failed", "stopped": "cold", "stopping": "stopping"}
_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
     b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
]


@dataclass(slots=True)
class Page:
    """One request to a signed-in page: who, their session's CSRF token, the form if posted,
    and the session's name in the portal's one-time maps (:func:`once.session_key`)."""

    req: Request
    who: Principal
    csrf: str
    form: dict[str, str]
    session: str

    def field(self, name: str) -> str:
        return self.form.get(name, "")


PageHandler = Callable[[Page], Awaitable[None]]


class PortalRoutes:
    def __init__(self, engine: Engine, settings: Settings, pool: Pool) -> None:
        self.engine = engine
        self.settings = settings
        self.pool = pool
        self.cfg = settings.portal
        self.secure = self.cfg.public_url.startswith("https://")
        self.directory = Directory(settings.ldap) if settings.ldap is not None else None
        self.limiter = SigninLimiter()
        self.flash = once.Flash()
        self.submissions = once.Submissions()
        self.trusted = parse_networks(settings.server.trusted_proxies)
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("fleetgate.portal", "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined,
        )
        static = resources.files("fleetgate.portal") / "static"
        self.static = {n: (static / n).read_bytes() for n in ("portal.css", "portal.js")}

    def routes(self) -> list[Route]:
        def r(method: str, path: str, h: Callable[[Request], Awaitable[None]], s: str) -> Route:
            return Route(method, path, h, "public", s)

        page, admin = self._page, self._admin_page
        return [
            r("GET", "/", self._root, "Redirects to the portal."),
            r("GET", P, self._root, "Redirects to the portal."),
            r("GET", f"{P}/static/portal.css", self._css, "The portal's style sheet."),
            r("GET", f"{P}/static/portal.js", self._js, "The portal's script (copy buttons)."),
            r("GET", f"{P}/login", self._login_form, "The sign-in page."),
            r("POST", f"{P}/login", self._login, "Sign in (username, password, csrf_token)."),
            r("POST", f"{P}/logout", page(self._logout, form=True), "Sign out."),
            r("GET", f"{P}/", page(self._models), "My models."),
            r("POST", f"{P}/models/start", page(self._start, form=True), "Start a model."),
            r("POST", f"{P}/models/stop", page(self._stop, form=True), "Stop a model (admin)."),
            r("GET", f"{P}/keys", page(self._keys), "My keys."),
            r("POST", f"{P}/keys/create", page(self._key_create, form=True), "Create a key."),
            r("POST", f"{P}/keys/rotate", page(self._key_rotate, form=True), "Rotate a key."),
            r("POST", f"{P}/keys/revoke", page(self._key_revoke, form=True), "Revoke a key."),
            r("GET", f"{P}/usage", page(self._usage), "My usage."),
            r("GET", f"{P}/start", page(self._get_started), "Get started: example code."),
            r("GET", f"{P}/admin/users", admin(self._admin_users), "Users and groups."),
            r("GET", f"{P}/admin/keys", admin(self._admin_keys), "Every key."),
            r("GET", f"{P}/admin/usage", admin(self._admin_usage), "Usage of everyone."),
            r("GET", f"{P}/admin/audit", admin(self._admin_audit), "The audit log."),
            r("GET", f"{P}/admin/models", admin(self._admin_models), "Models and replicas."),
        ]

    # -- plumbing -------------------------------------------------------------------------------

    def _ctx(self, who: Principal | None = None) -> Context:
        return Context(self.engine, self.settings, Actor.of(who) if who else Actor("portal"))

    async def _html(self, req: Request, status: int, template: str, *,
                    headers: list[tuple[bytes, bytes]] | None = None, **data: Any) -> None:
        body = self.env.get_template(template).render(
            public_url=self.cfg.public_url, form_token=once.new_form_token, **data).encode()
        hs = [(b"content-type", b"text/html; charset=utf-8"),
              (b"content-length", str(len(body)).encode()), *_HEADERS, *(headers or [])]
        await req.send({"type": "http.response.start", "status": status, "headers": hs})
        await req.send({"type": "http.response.body", "body": body})

    async def _redirect(self, req: Request, to: str,
                        headers: list[tuple[bytes, bytes]] | None = None) -> None:
        hs = [(b"location", to.encode()), (b"content-length", b"0"), *_HEADERS, *(headers or [])]
        await req.send({"type": "http.response.start", "status": 303, "headers": hs})
        await req.send({"type": "http.response.body", "body": b""})

    async def _error(self, req: Request, who: Principal | None, e: GatewayError,
                     csrf: str = "") -> None:
        await self._html(req, e.status, "error.html", who=who, csrf=csrf, message=e.message,
                         code=e.status, headers=list(
                             (k.encode(), v.encode()) for k, v in e.headers.items()))

    async def error_page(self, scope: Scope, send: Send, e: GatewayError) -> None:
        """An error the dispatcher raised under ``/portal`` (404, 405), as an HTML page."""
        async def nothing() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        await self._error(Request(scope, nothing, send, None), None, e)

    async def _form(self, req: Request) -> dict[str, str]:
        raw = await read_body(req.scope, req.receive, FORM_LIMIT)
        try:
            parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            raise InvalidRequest("The form could not be read.") from None
        return {k: v[0] for k, v in parsed.items()}

    def _cookie(self, req: Request, name: str) -> str | None:
        return sessions.read_cookie(req.header(b"cookie"), name)

    def _address(self, req: Request) -> str:
        client = req.scope.get("client")
        ip = client_address(client[0] if client else None, req.header(b"x-forwarded-for"),
                            self.trusted)
        return str(ip) if ip is not None else "-"

    def _who(self, sid: str | None) -> tuple[Principal, str] | None:
        """The principal and CSRF token of a live session (blocking: a worker thread)."""
        s = sessions.lookup(self.engine, sid)
        if s is None:
            return None
        p = account_svc.principal_for(self._ctx(), s.user_id)
        return None if p is None else (p, s.csrf_token)

    def _page(self, fn: PageHandler, *, form: bool = False,
              admin: bool = False) -> Callable[[Request], Awaitable[None]]:
        async def handle(req: Request) -> None:
            who: Principal | None = None
            csrf = ""
            try:
                sid = self._cookie(req, sessions.COOKIE)
                found = await asyncio.to_thread(self._who, sid)
                if found is None:
                    if form:
                        raise AuthError("Your session has ended; sign in again.",
                                        code="session_required")
                    await self._redirect(req, f"{P}/login")
                    return
                who, csrf = found
                fields = await self._form(req) if form else {}
                if form and not sessions.same(fields.get("csrf_token"), csrf):
                    raise PermissionDenied("The form's CSRF token is missing or wrong; reload "
                                           "the page and try again.", code="csrf_failed")
                if admin and not who.admin:
                    await asyncio.to_thread(
                        audit.denied, self._ctx(who), "portal.admin", "page", req.scope["path"],
                        {"code": "admin_required"})
                    raise PermissionDenied("This page is for admins.", code="admin_required")
                await fn(Page(req, who, csrf, fields, once.session_key(sid)))
            except GatewayError as e:
                await self._error(req, who, e, csrf)
        return handle

    def _admin_page(self, fn: PageHandler) -> Callable[[Request], Awaitable[None]]:
        return self._page(fn, admin=True)

    async def _render(self, page: Page, template: str, status: int = 200, **data: Any) -> None:
        await self._html(page.req, status, template, who=page.who, csrf=page.csrf, **data)

    # -- static and sign-in ---------------------------------------------------------------------

    async def _root(self, req: Request) -> None:
        await self._redirect(req, f"{P}/")

    async def _static(self, req: Request, name: str, ctype: bytes) -> None:
        body = self.static[name]
        await req.send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", ctype), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"max-age=3600"), (b"x-content-type-options", b"nosniff")]})
        await req.send({"type": "http.response.body", "body": body})

    async def _css(self, req: Request) -> None:
        await self._static(req, "portal.css", b"text/css; charset=utf-8")

    async def _js(self, req: Request) -> None:
        await self._static(req, "portal.js", b"text/javascript; charset=utf-8")

    async def _login_form(self, req: Request, status: int = 200, message: str = "",
                          username: str = "") -> None:
        # Before a session exists, the form's token is a double-submit cookie of its own.
        token = sessions.new_token()
        cookie = sessions.cookie(sessions.CSRF_COOKIE, token, secure=self.secure, max_age=3600,
                                 path=f"{P}/login")
        await self._html(req, status, "login.html", who=None, csrf=token, message=message,
                         username=username, headers=[(b"set-cookie", cookie)],
                         ldap=self.directory is not None)

    async def _login(self, req: Request) -> None:
        try:
            fields = await self._form(req)
        except GatewayError as e:
            await self._error(req, None, e)
            return
        username = fields.get("username", "").strip()
        password = fields.get("password", "")
        shown = username if valid_username(username) else ""
        if not sessions.same(fields.get("csrf_token"), self._cookie(req, sessions.CSRF_COOKIE)):
            await self._login_form(req, 403, "The form expired; please try again.", shown)
            return
        address = self._address(req)
        if self.limiter.blocked(username, address):
            await self._login_form(req, 429, "Too many failed sign-ins; wait a few minutes and "
                                   "try again.", shown)
            return
        # Refused before any bind or hash: an empty password would be an anonymous LDAP bind.
        if not valid_username(username) or not password:
            self.limiter.failed(username[:256], address)
            await self._login_form(req, 401, GENERIC_REFUSAL, shown)
            return
        try:
            user = await asyncio.to_thread(self._authenticate, username, password)
        except LdapUnavailable as e:
            await self._login_form(req, 503, str(e), shown)
            return
        except GatewayError as e:  # right password, but refused (group, unlinked name): say why
            await self._login_form(req, e.status, e.message, shown)
            return
        if user is None:
            self.limiter.failed(username, address)
            await self._login_form(req, 401, GENERIC_REFUSAL, shown)
            return
        self.limiter.succeeded(username)
        sid = await asyncio.to_thread(
            sessions.create, self.engine, user.id, self.cfg.session_ttl_s,
            self._cookie(req, sessions.COOKIE))
        cookie = sessions.cookie(sessions.COOKIE, sid, secure=self.secure,
                                 max_age=int(self.cfg.session_ttl_s), path="/")
        await self._redirect(req, f"{P}/", [(b"set-cookie", cookie)])

    def _authenticate(self, username: str, password: str) -> Any:
        """The user these credentials sign in, or ``None`` (blocking: a worker thread)."""
        ctx = self._ctx()
        if self.cfg.local_accounts:
            user = account_svc.local_signin(ctx, username, password)
            if user is not None:
                return user
        if self.directory is None:
            return None
        try:
            ident = self.directory.authenticate(username, password)
        except LdapRefused:
            return None
        return account_svc.ldap_signin(ctx, ident)

    async def _logout(self, page: Page) -> None:
        await asyncio.to_thread(sessions.end, self.engine, self._cookie(page.req, sessions.COOKIE))
        self.flash.drop(page.session)
        gone = sessions.cookie(sessions.COOKIE, "", secure=self.secure, max_age=0, path="/")
        await self._redirect(page.req, f"{P}/login", [(b"set-cookie", gone)])

    # -- models ---------------------------------------------------------------------------------

    async def _model_rows(self, who: Principal) -> list[dict[str, Any]]:
        _, snap = await fleet_api.fleet_status(self.pool, who)  # redacted for non-admins
        up_ok = who.admin or self.pool.fleet.up_access == "model_users"
        rows = []
        for m in snap["models"]:
            notes = [r.get("note") or r.get("reason") for r in m["replicas"]]
            rows.append({
                "name": m["model"], "status": m["status"],
                "state": STATE_WORDS.get(m["status"], m["status"]),
                "reason": next((n for n in notes if n), ""),
                "replicas": m["replicas"], "ready": m["ready"], "inflight": m["inflight"],
                "queued": m["queued"],
                "can_start": up_ok and m["status"] in ("stopped", "failed"),
                "context": m.get("context_length"),  # from the engine's /v1/models
            })
        return rows

    async def _models(self, page: Page) -> None:
        await self._render(page, "models.html", models=await self._model_rows(page.who))

    async def _fleet(self, page: Page, verb: str) -> None:
        fn = fleet_api.fleet_up if verb == "start" else fleet_api.fleet_down
        await fn(self.pool, page.who, {"model": page.field("model")})
        back = f"{P}/admin/models" if page.field("back") == "admin" else f"{P}/"
        await self._redirect(page.req, back)

    async def _start(self, page: Page) -> None:
        await self._fleet(page, "start")

    async def _stop(self, page: Page) -> None:
        await self._fleet(page, "stop")

    # -- keys -----------------------------------------------------------------------------------

    async def _keys(self, page: Page) -> None:
        who = page.who
        ctx = self._ctx(who)
        await asyncio.to_thread(authz.authorize, ctx, who, "key.read", who.user)
        views = await asyncio.to_thread(key_svc.list_keys, ctx, user=who.user)
        keys = [key_svc.as_json(v) for v in views]
        # After a create or rotate (the POST's 303): the value once, then only a note.
        query = page.req.query()
        verb = next((v for v in ("created", "rotated") if v in query), "")
        new_key, just = "", None
        if verb:
            try:
                kid = int(query[verb][0])
            except ValueError:
                kid = -1
            new_key = self.flash.take(page.session, kid) or ""
            just = next((k for k in keys if k["id"] == kid), None)
            if just is None and new_key:  # an admin rotated someone else's key
                just = {"id": kid, "name": f"key {kid}"}
            if just is None:
                verb = ""
        await self._render(page, "keys.html", keys=keys, new_key=new_key, just=just, verb=verb,
                           expiries=EXPIRY_CHOICES)

    async def _key_create(self, page: Page) -> None:
        who, ctx = page.who, self._ctx(page.who)

        async def create() -> str:
            name = page.field("name").strip()
            expires_text = page.field("expires")
            if expires_text not in {c for c, _ in EXPIRY_CHOICES}:
                raise InvalidRequest("Pick an expiry from the list.", param="expires")
            expires = keyfmt.parse_duration(expires_text) if expires_text else None
            await asyncio.to_thread(authz.authorize, ctx, who, "key.create", who.user,
                                    ("name", "expires"))
            key, rec = await asyncio.to_thread(key_svc.create_key, ctx, name=name, user=who.user,
                                               expires=expires)
            self.flash.put(page.session, rec.id, key)
            return f"{P}/keys?created={rec.id}"

        await self._redirect(page.req, await self.submissions.once(
            page.session, "create", page.field("form_token"), create))

    def _key_id(self, page: Page) -> int:
        try:
            return int(page.field("id"))
        except ValueError:
            raise InvalidRequest("No key was chosen.", param="id") from None

    async def _key_rotate(self, page: Page) -> None:
        who, ctx, kid = page.who, self._ctx(page.who), self._key_id(page)

        async def rotate() -> str:
            owner = await asyncio.to_thread(self._owner_of, ctx, who, kid)
            await asyncio.to_thread(authz.authorize, ctx, who, "key.rotate", owner, (), kid)
            key, _ = await asyncio.to_thread(key_svc.rotate_key, ctx, kid, owner=owner)
            self.flash.put(page.session, kid, key)
            return f"{P}/keys?rotated={kid}"

        await self._redirect(page.req, await self.submissions.once(
            page.session, f"rotate {kid}", page.field("form_token"), rotate))

    async def _key_revoke(self, page: Page) -> None:
        who, ctx, kid = page.who, self._ctx(page.who), self._key_id(page)
        owner = await asyncio.to_thread(self._owner_of, ctx, who, kid)
        await asyncio.to_thread(authz.authorize, ctx, who, "key.revoke", owner, (), kid)
        await asyncio.to_thread(key_svc.revoke_key, ctx, kid, owner=owner)
        back = f"{P}/admin/keys" if page.field("back") == "admin" else f"{P}/keys"
        await self._redirect(page.req, back)

    @staticmethod
    def _owner_of(ctx: Context, who: Principal, key_id: int) -> str:
        # A user's own key, or any key for an admin; another user's key is "not found".
        return key_svc.get_key(ctx, key_id, owner=None if who.admin else who.user).user

    # -- usage and example code -----------------------------------------------------------------

    def _usage_data(self, user_id: int | None, days: int = 30) -> dict[str, Any]:
        ctx = self._ctx()
        rows = usage_report.per_day(ctx, user_id=user_id, days=days)
        today = dt.datetime.now(dt.UTC).date()
        span = [today - dt.timedelta(days=days - 1 - i) for i in range(days)]
        svg = chart.stacked_bars(
            [chart.Bar(r.day, r.model, r.tokens) for r in rows], span,
            f"Tokens per day per model, last {days} days")
        return {"rows": rows, "chart": svg, "days": days,
                "quotas": usage_report.quotas_of(ctx, user_id) if user_id is not None else []}

    async def _usage(self, page: Page) -> None:
        data = await asyncio.to_thread(self._usage_data, page.who.user_id)
        await self._render(page, "usage.html", admin_view=False, **data)

    async def _get_started(self, page: Page) -> None:
        names = [m["name"] for m in await self._model_rows(page.who)]
        wanted = page.req.query().get("model", [""])[0]
        model = wanted if wanted in names else (names[0] if names else "MODEL")
        await self._render(page, "start.html", models=names, model=model,
                           base_url=f"{self.cfg.public_url}/v1", quoted=quote(model))

    # -- admin ----------------------------------------------------------------------------------

    async def _admin_users(self, page: Page) -> None:
        ctx = self._ctx(page.who)
        users = await asyncio.to_thread(user_svc.list_users, ctx)
        groups = await asyncio.to_thread(group_svc.list_groups, ctx)
        await self._render(page, "admin_users.html", users=users, groups=groups)

    async def _admin_keys(self, page: Page) -> None:
        views = await asyncio.to_thread(key_svc.list_keys, self._ctx(page.who))
        await self._render(page, "admin_keys.html", keys=[key_svc.as_json(v) for v in views])

    async def _admin_usage(self, page: Page) -> None:
        data = await asyncio.to_thread(self._usage_data, None)
        await self._render(page, "usage.html", admin_view=True, **data)

    async def _admin_audit(self, page: Page) -> None:
        entries = await asyncio.to_thread(audit.list_entries, self._ctx(page.who), limit=200)
        await self._render(page, "admin_audit.html", entries=[audit.as_json(e) for e in entries])

    async def _admin_models(self, page: Page) -> None:
        await self._render(page, "admin_models.html", models=await self._model_rows(page.who))
