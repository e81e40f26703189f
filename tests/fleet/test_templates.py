"""Templates: the pure decisions as tables (paths, matching, rights, capacity), the config's
checks, and the mechanism in-process over a launcher that records what it was asked to start."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleetgate import config
from fleetgate.auth.principals import Principal
from fleetgate.dataplane.routes import RouteTable
from fleetgate.errors import ConfigError, GatewayError
from fleetgate.fleet.launchers.base import NullLauncher
from fleetgate.fleet.pool import Pool
from fleetgate.fleet.templates import (
    Plan,
    Running,
    Templates,
    capacity,
    check_path,
    find_template,
    may_launch,
    plan_capacity,
)

CMD = ["engine", "--port", "{port}", "--model", "{model_path}", "--max-len", "512"]


def tpl(name: str = "t", match: tuple[str, ...] = ("Qwen/*",), **kw: Any) -> dict[str, Any]:
    backend = kw.pop("backend", {"type": "local", "command": CMD})
    return {"name": name, "match": list(match), "backend": backend, **kw}


def templates_of(*docs: dict[str, Any]) -> tuple[config.TemplateSettings, ...]:
    return config.parse({"templates": list(docs)}).templates


# --- paths -----------------------------------------------------------------------------------

BAD_PATHS = [
    ("parent", "../etc"),
    ("parent inside", "Qwen/../../etc/passwd"),
    ("a flag", "-rf"),
    ("a flag with value", "--port=1"),
    ("command substitution", "$(id)"),
    ("backticks", "`id`"),
    ("semicolon", "a;b"),
    ("a space", "Qwen/a b"),
    ("NUL byte", "Qwen/a\0b"),
    ("newline", "Qwen/a\nb"),
    ("10 KB", "Qwen/" + "a" * 10_000),
    ("201 characters", "Q" * 201),
    ("Cyrillic a look-alike", "Qwen/Qw\u0430n"),
    ("fullwidth solidus", "Qwen\uff0fx"),
    ("division slash", "Qwen\u2215x"),
    ("non-breaking hyphen", "Qwen/a\u2011b"),
    ("empty", ""),
    ("not a string", 7),
    ("absolute where no pattern is", "/models/x"),
]


@pytest.mark.parametrize(("why", "path"), BAD_PATHS, ids=[b[0] for b in BAD_PATHS])
def test_bad_paths_are_400_invalid_model_path(why: str, path: object) -> None:
    with pytest.raises(GatewayError) as e:
        check_path(path, absolute_ok=False)
    assert (e.value.status, e.value.error_code) == (400, "invalid_model_path")


GOOD_PATHS = ["Qwen/Qwen3-8B", "org/model.v2_final", "a", "x/--port", "Q" * 200, "a..b/c"]


@pytest.mark.parametrize("path", GOOD_PATHS)
def test_good_paths_pass_unchanged(path: str) -> None:
    assert check_path(path, absolute_ok=False) == path


def test_absolute_paths_only_where_a_pattern_is_absolute() -> None:
    assert check_path("/models/x", absolute_ok=True) == "/models/x"


MATCHES = [
    # (path, expected template name or None)
    ("Qwen/Qwen3-8B", "qwen"),
    ("Qwen/sub/dir", "qwen"),  # * also matches /
    ("meta/Llama", "any-relative"),
    ("/models/llama", "local-dirs"),
    ("/etc/passwd", None),  # "*" is relative: it never takes an absolute path
    ("/models", None),
]


@pytest.mark.parametrize(("path", "want"), MATCHES)
def test_first_matching_template_wins(path: str, want: str | None) -> None:
    ts = templates_of(
        tpl("qwen", ("Qwen/*",)),
        tpl("local-dirs", ("/models/*",)),
        tpl("any-relative", ("*",)),
        tpl("never", ("Qwen/*",)),  # after "qwen": never chosen for Qwen paths
    )
    got = find_template(ts, path)
    assert (got.name if got else None) == want


LAUNCH = [
    # (principal, launch groups, may launch)
    (Principal("u", groups=("research",)), ("research",), True),
    (Principal("u", groups=("students",)), ("research",), False),
    (Principal("u", groups=()), ("research",), False),
    (Principal("a", admin=True), (), True),
    (Principal("u", groups=("research", "x")), ("x",), True),
]


@pytest.mark.parametrize(("who", "groups", "want"), LAUNCH)
def test_who_may_launch(who: Principal, groups: tuple[str, ...], want: bool) -> None:
    (t,) = templates_of(tpl(launch=list(groups)))
    assert may_launch(who, t) is want


def r(name: str, used: float, busy: bool = False, starting: bool = False) -> Running:
    return Running(name, used, busy, starting)


CAPACITY = [
    ("room", [r("a", 1)], 2, Plan("room")),
    ("empty", [], 1, Plan("room")),
    ("evict the idle one", [r("a", 5), r("b", 1, busy=True)], 2, "a"),
    ("least recently used first", [r("a", 5), r("b", 3), r("c", 9)], 3, "b"),
    ("never a starting one", [r("a", 1, starting=True), r("b", 4)], 2, "b"),
    ("full: all busy", [r("a", 1, busy=True)], 1, "full"),
    ("full: starting and busy", [r("a", 1, starting=True), r("b", 1, busy=True)], 2, "full"),
    ("over the limit still evicts", [r("a", 1), r("b", 2)], 1, "a"),
]


@pytest.mark.parametrize(("case", "running", "limit", "want"), CAPACITY, ids=[c[0] for c in CAPACITY])
def test_capacity_plan(case: str, running: list[Running], limit: int, want: Any) -> None:
    plan = plan_capacity(running, limit)
    if isinstance(want, Plan):
        assert plan == want
    elif want == "full":
        assert plan.action == "full" and plan.victim is None and "none idle" in plan.reason
    else:
        assert (plan.action, plan.victim) == ("evict", want)


def test_capacity_is_bounded_by_the_gpus_listed() -> None:
    gpu_backend = {"type": "local", "command": CMD, "gpus": [0, 1, 2], "gpus_per_replica": 1}
    (t,) = templates_of(tpl(max_models=5, backend=gpu_backend))
    assert capacity(t) == 3
    (t,) = templates_of(tpl(max_models=2, backend=gpu_backend))
    assert capacity(t) == 2
    (t,) = templates_of(tpl(max_models=4))
    assert capacity(t) == 4


# --- config ----------------------------------------------------------------------------------

CONFIG_ERRORS = [
    (tpl(backend={"type": "local", "command": ["e", "--port", "{port}"]}),
     "templates[0]: backend.command must contain the {model_path} slot"),
    (tpl(backend={"type": "local", "command": CMD, "model_path": "/x"}),
     "templates[0].backend: a template's backend takes model_path from the request"),
    (tpl(match=()), "templates[0].match"),
    (tpl(match=("a b",)), "templates[0].match: 'a b' is not a model path pattern"),
    (tpl(backend={"type": "static", "urls": ["http://x"]}), "templates[0].backend"),
    (tpl(max_models=0), "templates[0].max_models"),
    (tpl(api_key="has space"), "templates[0].api_key"),
    (tpl(launchers=["x"]), "templates[0].launchers: unknown key"),
]


@pytest.mark.parametrize(("doc", "error"), CONFIG_ERRORS)
def test_config_errors_name_the_key(doc: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse({"templates": [doc]})
    assert any(p.startswith(error) for p in e.value.problems), e.value.problems


def test_template_names_are_unique() -> None:
    with pytest.raises(ConfigError, match="template name 't' appears twice"):
        config.parse({"templates": [tpl(), tpl()]})


def test_the_model_built_differs_only_by_its_path() -> None:
    (t,) = templates_of(tpl(scaling={"idle_timeout_s": 5}, api_key="k" * 20))
    m = Templates.settings_for(t, "Qwen/A")
    assert (m.name, m.upstream_name, m.api_key) == ("Qwen/A", "Qwen/A", "k" * 20)
    assert m.backend.model_path == "Qwen/A"
    assert m.backend.command == t.backend.command and m.backend.env == t.backend.env
    assert m.scaling.idle_timeout_s == 5


# --- the mechanism, in-process ---------------------------------------------------------------

ADMIN = Principal("admin", admin=True)
RESEARCHER = Principal("r", groups=("research",))
STUDENT = Principal("s", groups=("students",))
NARROW_ADMIN = Principal("a", admin=True, models=["Qwen/allowed-*"])


async def mechanism(**template: Any) -> tuple[Templates, NullLauncher, Pool]:
    settings = config.parse({
        "fleet": {"control_interval_s": 0.05},
        "templates": [tpl(launch=["research"], **template)],
    })
    launcher = NullLauncher()
    pool = Pool(settings, launchers={"local": launcher})
    routes = RouteTable.from_models(settings.models)
    t = Templates(settings.templates, pool, routes, interval_s=0.05)
    await pool.start()
    return t, launcher, pool


async def until(pred: Any, what: str, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout_s}s")


@pytest.mark.asyncio
@pytest.mark.parametrize(("why", "path"), BAD_PATHS, ids=[b[0] for b in BAD_PATHS])
async def test_a_bad_path_starts_nothing(why: str, path: Any) -> None:
    t, launcher, pool = await mechanism()
    try:
        for call, param in ((t.route_for, "model"), (t.up, "model_path")):
            with pytest.raises(GatewayError) as e:
                call(ADMIN, path)
            assert (e.value.error_code, e.value.param) == ("invalid_model_path", param)
        await asyncio.sleep(0.2)  # a controller step or two: nothing was asked for
        assert launcher.started == [] and list(pool.groups) == [] and len(t.routes) == 0
    finally:
        await pool.stop(timeout_s=5)


@pytest.mark.asyncio
async def test_who_gets_which_error_and_nothing_starts() -> None:
    t, launcher, pool = await mechanism()
    try:
        cases = [
            (ADMIN, "meta/Llama", 404, "model_not_found"),
            (STUDENT, "Qwen/A", 403, "launch_not_allowed"),
            (NARROW_ADMIN, "Qwen/other", 403, "model_not_allowed"),
            (Principal("n", groups=("research",), models=["meta/*"]), "Qwen/A", 403,
             "model_not_allowed"),
        ]
        for who, path, status, code in cases:
            with pytest.raises(GatewayError) as e:
                t.up(who, path)
            assert (e.value.status, e.value.error_code) == (status, code), (who, path)
        await asyncio.sleep(0.2)
        assert launcher.started == []
    finally:
        await pool.stop(timeout_s=5)


@pytest.mark.asyncio
async def test_up_adds_a_route_and_launches_from_the_template_only() -> None:
    t, launcher, pool = await mechanism()
    try:
        doc = t.up(RESEARCHER, "Qwen/A")
        assert doc["model"] == "Qwen/A" and doc["status"] in ("pending", "starting")
        assert t.up(RESEARCHER, "Qwen/A")["model"] == "Qwen/A"  # idempotent
        await until(lambda: launcher.started, "a launch")
        (spec,) = launcher.started
        assert spec.model == "Qwen/A" and spec.backend.model_path == "Qwen/A"
        assert spec.backend.command == tuple(CMD)
        route = t.routes.get("Qwen/A")
        assert route is not None and route.dynamic and route.entry["dynamic"] is True
        # A student may not launch, but may use a model that runs.
        assert t.route_for(STUDENT, "Qwen/A") is route
    finally:
        await pool.stop(timeout_s=5)


@pytest.mark.asyncio
async def test_full_with_only_starting_models_is_503_and_says_why() -> None:
    t, launcher, pool = await mechanism(max_models=1)
    try:
        t.up(RESEARCHER, "Qwen/A")  # never ready (nothing answers health): still starting
        with pytest.raises(GatewayError) as e:
            t.up(RESEARCHER, "Qwen/B")
        assert (e.value.status, e.value.error_code) == (503, "capacity_full")
        assert "retry-after" in e.value.headers and "none idle" in e.value.message
        (desc,) = t.describe(ADMIN)
        assert desc["models"] == ["Qwen/A"] and "none idle" in desc["full"]
        assert "Qwen/B" not in pool.groups
    finally:
        await pool.stop(timeout_s=5)


@pytest.mark.asyncio
async def test_a_stopped_model_is_forgotten() -> None:
    t, launcher, pool = await mechanism()
    try:
        forgotten: list[str] = []
        t.on_forget = forgotten.append
        t.up(ADMIN, "Qwen/A")
        await until(lambda: launcher.started, "a launch")
        assert t.reap() == []  # still running: kept
        pool.down("Qwen/A")
        await until(lambda: t.reap() == ["Qwen/A"], "reaped")
        assert "Qwen/A" not in t.routes and "Qwen/A" not in pool.groups
        assert "Qwen/A" not in pool.controllers and forgotten == ["Qwen/A"]
    finally:
        await pool.stop(timeout_s=5)


@pytest.mark.asyncio
async def test_model_path_without_templates_is_404() -> None:
    from fleetgate.fleet import api_handlers

    pool = Pool(config.parse({}))
    with pytest.raises(GatewayError) as e:
        await api_handlers.fleet_up(pool, ADMIN, {"model_path": "Qwen/A"}, None)
    assert (e.value.status, e.value.error_code) == (404, "model_not_found")


@pytest.mark.asyncio
async def test_an_engine_that_exits_at_once_makes_up_answer_failed(tmp_path: Any) -> None:
    import sys

    settings = config.parse({
        "fleet": {"control_interval_s": 0.05, "state_dir": str(tmp_path / "state")},
        "templates": [tpl(
            backend={
                "type": "local",
                "command": [sys.executable, "-c", "import sys; sys.exit(3)", "{port}",
                            "{model_path}"],
                "log_dir": str(tmp_path / "logs"),
                "health_interval_s": 0.1,
            },
            restart={"max_restarts": 0, "backoff_initial_s": 0},
            launch=["research"],
        )],
    })
    pool = Pool(settings)
    t = Templates(settings.templates, pool, RouteTable(), interval_s=0.05)
    await pool.start()
    try:
        assert t.up(ADMIN, "Qwen/broken")["status"] == "pending"
        await until(lambda: pool.groups["Qwen/broken"].failed_now(), "failed")
        # Polling /up again answers failed (it doesn't clear the hold and relaunch).
        for who, detail in ((ADMIN, "exited with code 3"), (RESEARCHER, "an admin can see")):
            doc = t.up(who, "Qwen/broken")
            assert doc["status"] == "failed" and detail in doc["detail"], doc
        assert pool.groups["Qwen/broken"].stats.launches == 1
        assert t.reap() == []  # a failure stays visible until its cooldown ends
    finally:
        await pool.stop(timeout_s=5)


def test_a_slurm_template_puts_the_path_in_the_job_script_as_one_argument() -> None:
    import shlex

    from fleetgate.fleet.slurm_script import JobParams, render

    (t,) = templates_of(tpl(backend={
        "type": "slurm",
        "command": "vllm serve {model_path} --port {port} --served-model-name {served_name}",
        "discovery": "callback",
        "callback_url": "http://gw:8000",
        "partition": "gpu",
    }))
    m = Templates.settings_for(t, "/scratch/ckpt/run-7")
    script = render(m.backend, JobParams(
        model=m.name, served_name=m.upstream_name, replica_id="r1", job_name="fg-r1",
        token="t" * 20, log_path="/tmp/%j.log", report_to="http://gw:8000/v1/fleet/callback",
    ))
    (exec_line,) = [ln for ln in script.splitlines() if ln.startswith("exec ")]
    argv = shlex.split(exec_line)
    assert argv[:4] == ["exec", "vllm", "serve", "/scratch/ckpt/run-7"]
    assert argv[argv.index("--served-model-name") + 1] == "/scratch/ckpt/run-7"
    assert "#SBATCH --partition=gpu" in script
