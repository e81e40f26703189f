"""The SLURM launcher's pure parts and its edges, without a cluster: config validation that
names the key, the job script's quoting (run under bash), squeue parsing, and the one-time
callback token (against a stand-in ``sbatch`` that only records the script)."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fleetgate import config
from fleetgate.errors import ConfigError
from fleetgate.fleet.launchers.base import Handle, LaunchError, LaunchSpec
from fleetgate.fleet.launchers.slurm import SlurmLauncher
from fleetgate.fleet.launchers.slurm_client import parse_duration, parse_squeue
from fleetgate.fleet.slurm_script import JobParams, job_name, render
from fleetgate.fleet.spec import FleetSettings, SlurmBackend

BASE: dict[str, Any] = {
    "type": "slurm",
    "command": "engine --port {port}",
    "callback_url": "http://gw:8000",
}


def backend(**over: Any) -> SlurmBackend:
    s = config.parse({"models": [{"name": "m", "backend": {**BASE, **over}}]})
    b = s.models[0].backend
    assert isinstance(b, SlurmBackend)
    return b


BAD = [
    ({"partition": "gpu;rm -rf /"}, "models[0].backend.partition"),
    ({"mem": "lots"}, "models[0].backend.mem"),
    ({"time_limit": "4 hours"}, "models[0].backend.time_limit"),
    ({"sbatch_extra": ["--constraint=a100 --x"]}, "models[0].backend.sbatch_extra"),
    ({"sbatch_extra": ["--x=$(id)"]}, "models[0].backend.sbatch_extra"),
    ({"partiton": "gpu"}, "models[0].backend.partiton: unknown key"),
    ({"callback_url": None}, "callback_url is required"),
    ({"discovery": "file"}, "shared_dir is required"),
    ({"poll_interval_s": 1}, "models[0].backend.poll_interval_s"),
    ({"submit": {"via": "ssh", "host": "login1"}}, "known_hosts is required"),
    ({"submit": {"via": "carrier-pigeon"}}, "models[0].backend.submit.via"),
    ({"command": "engine"}, "{port}"),
    ({"env": {"BAD NAME": "x"}}, "models[0].backend.env"),
    ({"pending_timeout_action": "shrug"}, "models[0].backend.pending_timeout_action"),
]


@pytest.mark.parametrize(("over", "named"), BAD, ids=[str(o) for o, _ in BAD])
def test_a_bad_slurm_config_names_the_key(over: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as e:
        backend(**over)
    assert any(named in p for p in e.value.problems), e.value.problems


def test_defaults_are_the_issues_contract() -> None:
    b = backend()
    assert (b.handover_before_s, b.poll_interval_s, b.discovery) == (300, 10, "callback")
    assert (b.pending_timeout_action, b.submit.via, b.keep_on_shutdown) == ("report", "local", False)


def test_the_job_script_quotes_everything_but_setup(tmp_path: Path) -> None:
    """Run the rendered script under bash (no SLURM): hostile text in the served name, an
    env value and a literal arrives as plain arguments, and setup runs as written."""
    shared = tmp_path / "shared"
    evil = "x'; touch PWNED; echo '$(touch PWNED2)`touch PWNED3`"
    b = backend(
        command=["printf", "%s\\n", "{served_name}", "--host={host}", "--port", "{port}", evil],
        env={"FG_TEST": "a b {port} $(touch PWNED4)"},
        setup=["echo setup-ran >&2"],
        discovery="file",
        shared_dir=str(shared),
        callback_url=None,
        partition="debug",
        mem="1G",
        time_limit="00:02:00",
        sbatch_extra=["--constraint=a100"],
    )
    report = str(shared / "gw" / "m-abc.json")
    script = render(b, JobParams("m", evil, "m-abc", job_name("gw", "m", "m-abc"), "tok_1",
                                 str(tmp_path / "%j.log"), report))
    assert "#SBATCH --partition=debug" in script and "#SBATCH --constraint=a100" in script
    assert "#SBATCH --job-name=fleetgate.gw.m.abc" in script
    out = subprocess.run(["bash", "-c", script + "", "job"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == evil and lines[-1] == evil
    assert lines[1].startswith("--host=") and lines[3].isdigit()
    assert "setup-ran" in out.stderr
    assert not list(tmp_path.glob("PWNED*"))
    doc = __import__("json").loads(Path(report).read_text())
    assert doc["token"] == "tok_1" and doc["port"] == int(lines[3])
    assert stat.S_IMODE(os.stat(report).st_mode) == 0o600


SQUEUE = """\
12|fleetgate.gw.m.abc|PENDING|Resources||2:00|2026-11-24T03:45:36
13|fleetgate.gw.m.def|RUNNING|None|node7|1-01:59:58|2026-11-24T03:43:36
14|someone-else|RUNNING|None|node7|1:00|2026-11-24T03:43:36
15|fleetgate.other.m.abc|RUNNING|None|node7|1:00|N/A
"""


def test_squeue_lines_are_parsed_and_filtered_to_this_gateway() -> None:
    jobs = parse_squeue(SQUEUE, "fleetgate.gw.")
    assert sorted(jobs) == ["12", "13"]
    assert jobs["12"].reason == "Resources" and jobs["12"].time_left_s == 120
    assert jobs["13"].node == "node7" and jobs["13"].time_left_s == 93598
    assert parse_duration("UNLIMITED") is None and parse_duration("0:05") == 5


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``sbatch`` that saves the script it is given and answers job id 4242, and an
    ``squeue`` that answers what ``squeue-out`` holds (job 4242 queued), counting its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    saved = tmp_path / "script.sh"
    for name, body in {
        "sbatch": f'cat > {saved}\necho "4242;cluster"\n',
        "scancel": "exit 0\n",
        "squeue": f"echo call >> {tmp_path}/squeue-calls\ncat {tmp_path}/squeue-out\n",
    }.items():
        p = bin_dir / name
        p.write_text("#!/bin/sh\n" + body)
        p.chmod(0o755)
    (tmp_path / "squeue-out").write_text("4242|fleetgate.gw.m.abc|PENDING|Priority||2:00|N/A\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return saved


def test_callback_tokens_are_one_time_and_only_the_right_one_works(
    tmp_path: Path, fake_sbatch: Path
) -> None:
    launcher = SlurmLauncher(FleetSettings(state_dir=str(tmp_path / "state"), gateway_id="gw"))
    spec = LaunchSpec("m", "m-abc", backend(log_dir=str(tmp_path / "logs")), "m")
    h = asyncio.run(launcher.start(spec))
    assert h.info["job_id"] == "4242" and h.url == ""
    token = re.search(r'"token": "([^"]+)"', fake_sbatch.read_text())
    assert token
    state = (tmp_path / "state" / "slurm" / "m-abc.json").read_text()
    assert token.group(1) not in state  # only its digest is kept
    assert launcher.accept_callback("m-abc", "wrong", "node1", 8000) is not None
    assert launcher.accept_callback("m-nope", token.group(1), "node1", 8000) is not None
    assert launcher.accept_callback("m-abc", token.group(1), "evil/x", 8000) is not None
    assert launcher.accept_callback("m-abc", token.group(1), "node1", 8000) is None
    assert launcher.accept_callback("m-abc", token.group(1), "node2", 9000) is not None  # replay
    obs = asyncio.run(launcher.poll(h))
    assert obs.running and obs.public["slurm_state"] == "PENDING"
    asyncio.run(launcher.stop(h))


def test_a_job_gone_from_the_queue_is_noticed(tmp_path: Path, fake_sbatch: Path) -> None:
    (tmp_path / "squeue-out").write_text("")  # squeue, asked after sbatch, doesn't list it
    launcher = SlurmLauncher(FleetSettings(state_dir=str(tmp_path / "state"), gateway_id="gw"))
    spec = LaunchSpec("m", "m-abc", backend(log_dir=str(tmp_path / "logs")), "m")
    h = asyncio.run(launcher.start(spec))
    obs = asyncio.run(launcher.poll(h))
    assert not obs.running and obs.kind == "gone" and "4242) left the queue" in obs.detail


def test_an_sbatch_refusal_is_a_launch_error_with_its_stderr(
    tmp_path: Path, fake_sbatch: Path
) -> None:
    (fake_sbatch.parent / "bin" / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n"
    )
    launcher = SlurmLauncher(FleetSettings(state_dir=str(tmp_path / "state"), gateway_id="gw"))
    spec = LaunchSpec("m", "m-abc", backend(log_dir=str(tmp_path / "logs")), "m")
    with pytest.raises(LaunchError) as e:
        asyncio.run(launcher.start(spec))
    assert e.value.kind == "sbatch" and "invalid partition specified: nope" in e.value.message


def test_one_squeue_call_per_interval_however_many_replicas_poll(
    tmp_path: Path, fake_sbatch: Path
) -> None:
    """Ten replicas polling together, three rounds inside the interval: one squeue call. The
    answer is shared: each replica sees its job queued with its reason."""
    launcher = SlurmLauncher(FleetSettings(state_dir=str(tmp_path / "state"), gateway_id="gw"))
    b = backend(log_dir=str(tmp_path / "logs"), poll_interval_s=30)

    async def scenario() -> list[Any]:
        hs = [await launcher.start(LaunchSpec("m", f"m-{i}", b, "m")) for i in range(10)]
        seen = []
        for _ in range(3):
            seen += await asyncio.gather(*(launcher.poll(h) for h in hs))
        return seen

    seen = asyncio.run(scenario())
    calls = (tmp_path / "squeue-calls").read_text().splitlines()
    assert len(calls) == 1
    assert all(o.running and not o.started and "queued in SLURM: Priority" in o.note for o in seen), seen[0]
    # Waiting for an address, replicas look every second: from the snapshot, no squeue call.
    assert launcher.poll_every_s(Handle("m-0", "m", "")) == 1.0
    assert launcher.poll_every_s(Handle("m-0", "m", "http://n:1")) == 30


def test_an_unreachable_ssh_login_node_is_a_launch_error_not_a_crash(tmp_path: Path) -> None:
    """The real `ssh` against a loopback port nobody listens on: a clear error to retry."""
    from fleetgate.localnet import free_port

    known = tmp_path / "known_hosts"
    known.write_text("")
    submit = {"via": "ssh", "host": "127.0.0.1", "port": free_port(), "user": "nobody",
              "known_hosts": str(known)}
    launcher = SlurmLauncher(FleetSettings(state_dir=str(tmp_path / "state"), gateway_id="gw"))
    spec = LaunchSpec("m", "m-abc", backend(submit=submit), "m")
    with pytest.raises(LaunchError) as e:
        asyncio.run(launcher.start(spec))
    assert e.value.kind == "ssh" and "cannot reach 127.0.0.1 over SSH" in e.value.message


def test_the_cli_shows_a_queued_job_with_its_reason() -> None:
    from fleetgate.cli.fleet import table

    doc = {"models": [{"model": "m", "status": "starting", "replicas": [
        {"id": "m-1", "state": "starting", "slurm_state": "PENDING",
         "pending_reason": "QOSMaxJobsPerUserLimit", "note": "queued in SLURM: QOSMaxJobsPerUserLimit",
         "inflight": 0, "idle_s": 1, "age_s": 5, "reason": "submitted as SLURM job 7"},
        {"id": "m-2", "state": "ready", "slurm_state": "RUNNING", "inflight": 2, "idle_s": 0,
         "age_s": 50, "reason": "health check passed"},
    ]}]}
    rows = table(doc).splitlines()
    assert "queued (QOSMaxJobsPerUserLimit)" in rows[1] and "queued in SLURM" in rows[1]
    assert " ready " in rows[2] and "health check passed" in rows[2]


def test_a_job_requeued_after_running_is_replaced_not_waited_for(
    tmp_path: Path, fake_sbatch: Path
) -> None:
    """Preempted and requeued, a job loses its engine and its spent token can't report a new
    address: the launcher says it ended, so the supervisor replaces it."""
    out = tmp_path / "squeue-out"
    out.write_text("4242|fleetgate.gw.m.abc|RUNNING|None|node1|1:00:00|N/A\n")
    launcher = SlurmLauncher(FleetSettings(state_dir=str(tmp_path / "state"), gateway_id="gw"))
    h = asyncio.run(launcher.start(LaunchSpec("m", "m-abc", backend(log_dir=str(tmp_path)), "m")))
    first = asyncio.run(launcher.poll(h))
    assert first.running and first.started and first.ends_in_s is not None
    out.write_text("4242|fleetgate.gw.m.abc|PENDING|BeginTime||1:00:00|N/A\n")
    launcher._queues.clear()  # the next poll asks squeue again (not waiting out the interval)
    second = asyncio.run(launcher.poll(h))
    assert not second.running and second.kind == "requeued"
