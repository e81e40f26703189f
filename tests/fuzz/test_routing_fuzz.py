"""Property-based fuzzing of the router (hypothesis, bounded) over the gateway's real routes.

Arbitrary methods and paths, and paths made from the declared ones by the edits an attacker
tries (a suffix, a prefix, a changed case, doubled or encoded slashes, dot segments, an empty
or slash-bearing parameter): :meth:`Router.match` returns a route only for a declared
(method, path), or a template whose ``{name}`` segments are each one non-empty segment; never
by prefix. Anything else is a 404 ``unknown_url``, or a 405 whose ``Allow`` lists exactly the
methods declared for that path. No other exception.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleetgate.api.routing import Route, Router
from fleetgate.app import create_app
from fleetgate.config import parse
from fleetgate.errors import MethodNotAllowed, NotFound

FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _routes() -> list[Route]:
    # keys mode has the most routes (the admin API); nothing is started, no request is served.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(parse({"store": {"url": f"sqlite:///{Path(tmp) / 'fg.db'}"}}))
        routes = list(app.router.routes)
        if app.engine is not None:
            app.engine.dispose()
    return routes


ROUTES = _routes()
ROUTER = Router(ROUTES, authenticate=None)  # type: ignore[arg-type]  # match() never calls it
METHODS = sorted({r.method for r in ROUTES})


def covers(template: str, path: str) -> dict[str, str] | None:
    """The parameters if ``template`` covers ``path``, else None: the oracle, written apart
    from the router. Exact paths match only themselves. A template matches segment by segment,
    a ``{name}`` segment being any one non-empty segment."""
    if "{" not in template:
        return {} if path == template else None
    if not path.startswith("/"):
        return None
    t = template.split("/")
    p = path.split("/")
    if len(t) != len(p):
        return None
    params: dict[str, str] = {}
    for ts, ps in zip(t, p, strict=True):
        if ts.startswith("{") and ts.endswith("}"):
            if not ps:
                return None
            params[ts[1:-1]] = ps
        elif ts != ps:
            return None
    return params


def expected(path: str) -> tuple[dict[str, Route], dict[str, str]]:
    """The routes (by method) that should serve ``path``, and the parameters."""
    exact = {r.method: r for r in ROUTES if "{" not in r.path and r.path == path}
    if exact:
        return exact, {}
    hits = [(r, covers(r.path, path)) for r in ROUTES if "{" in r.path]
    hits = [(r, p) for r, p in hits if p is not None]
    # No two templates may claim one path: the router's choice would depend on their order.
    assert len({r.path for r, _ in hits}) <= 1, [r.path for r, _ in hits]
    return {r.method: r for r, _ in hits}, (hits[0][1] if hits else {})


def _edit(path: str, how: int, junk: str) -> str:
    edits = [
        lambda: path + junk,                               # a suffix
        lambda: path + "/" + junk,                         # one more segment
        lambda: junk + path,                               # a prefix
        lambda: path.upper(),
        lambda: path.replace("/", "//", 1),
        lambda: path.replace("/", "/./", 1),
        lambda: path + "/..",
        lambda: path.replace("{name}", junk).replace("{id}", junk),  # any parameter value
        lambda: path.replace("{name}", "").replace("{id}", ""),      # an empty parameter
        lambda: path.replace("{name}", f"{junk}/x").replace("{id}", f"{junk}/x"),
        lambda: path[: max(1, len(path) - len(junk))],      # truncated
        lambda: path.replace("/", "%2F"),
        lambda: path + "?" + junk,                          # a query the server should have cut
        lambda: path + "\x00",
    ]
    return edits[how % len(edits)]()


SEGMENT = st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=12)
PATHS = st.one_of(
    st.builds(_edit, st.sampled_from([r.path for r in ROUTES]), st.integers(0, 13),
              st.text(max_size=8)),
    st.sampled_from([r.path for r in ROUTES]).map(  # templates with real-looking values
        lambda p: p.replace("{name}", "alice").replace("{id}", "7")),
    st.builds(  # templates with a parameter value the router must refuse or take whole
        lambda p, v: p.replace("{name}", v).replace("{id}", v),
        st.sampled_from([r.path for r in ROUTES if "{" in r.path]),
        st.sampled_from(["", "a/b", "/", ".", "..", "%2F"]) | SEGMENT),
    st.lists(SEGMENT, max_size=6).map(lambda segs: "/" + "/".join(segs)),
    st.text(max_size=40),
)
ANY_METHOD = st.sampled_from([*METHODS, "get", "Get", "HEAD", "OPTIONS", "PUT", "TRACE",
                              "CONNECT", "", "GET ", "POST\r\n"]) | st.text(max_size=8)


@FUZZ
@given(method=ANY_METHOD, path=PATHS)
@example(method="POST", path="/admin/v1/keys//rotate")  # an empty parameter in the middle
@example(method="GET", path="/admin/v1/users/a/b")
@example(method="GET", path="/v1/models/")
@example(method="POST", path="/v1/chat/completions/x")
def test_only_declared_routes_match(method: str, path: str) -> None:
    want, params = expected(path)
    try:
        route, got_params = ROUTER.match(method, path)
    except NotFound as e:
        assert not want, f"{method} {path!r} should reach {sorted(want)}"
        assert e.status == 404 and e.error_code == "unknown_url"
        return
    except MethodNotAllowed as e:
        assert want and method not in want, f"{method} {path!r}"
        assert e.status == 405 and e.headers["allow"] == ", ".join(sorted(want))
        return
    assert method in want and route is want[method], f"{method} {path!r} matched {route.path}"
    assert got_params == params
    for value in got_params.values():
        assert value and "/" not in value


@FUZZ
@given(route=st.sampled_from([r for r in ROUTES if "{" in r.path]), value=SEGMENT)
def test_every_template_matches_any_one_segment_value(route: Route, value: str) -> None:
    path = route.path.replace("{name}", value).replace("{id}", value)
    want, _ = expected(path)
    matched, params = ROUTER.match(route.method, path)
    assert matched is want[route.method]
    if matched is route:
        assert set(params.values()) == {value}


def test_every_declared_route_matches_itself() -> None:
    for r in ROUTES:
        path = r.path.replace("{name}", "n").replace("{id}", "1")
        assert ROUTER.match(r.method, path)[0] is r


def test_templates_do_not_trim_slashes() -> None:
    """Once, /admin/v1/users/bob/ reached GET /admin/v1/users/{name} (slashes were trimmed
    around template paths, not exact ones); this fuzz's oracle flagged it."""
    for path in ("/admin/v1/users/bob/", "//admin/v1/users/bob", "/admin/v1/keys/7//",
                 "admin/v1/users/bob"):
        with pytest.raises(NotFound):
            ROUTER.match("GET", path)
