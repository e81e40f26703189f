"""The job script of a SLURM replica, rendered from the model's config (pure: no I/O).

What reaches the script and how it is made safe:

* ``#SBATCH`` values (partition, qos, account, gres, cpus, mem, time, ``sbatch_extra``, the
  output path) are validated by :class:`~fleetgate.fleet.spec.SlurmBackend` to a narrow
  character set: no spaces, quotes, newlines or shell characters.
* The engine ``command`` and ``env`` values are templates: their literal text and every slot
  known at submit time (``{model_path}``, ``{served_name}``, ...) are ``shlex.quote``-d, so a
  model path chosen by a request can't inject shell. ``{port}`` and ``{host}`` are known only
  on the node; they become ``"${FG_PORT}"`` / ``"${FG_HOST}"``.
* ``setup`` lines are the admin's own shell (``module load ...``), written as given.
* The one-time token, replica id and callback URL go into a quoted heredoc (no expansion) as
  JSON string literals; their character sets are checked here too.

The script picks a free port on its node (``python3``, which any vLLM node has), reports
``host:port`` to the gateway (``discovery: callback``: an HTTP POST with the token, retried for
about 30 s; ``file``: a JSON file written atomically under ``shared_dir``), then ``exec``s the
engine, so ``scancel``'s signal reaches the engine itself.
"""

from __future__ import annotations

import json
import re
import shlex
import string
from dataclasses import dataclass

from fleetgate.fleet.spec import SlurmBackend

#: Every job this gateway submits is named ``fleetgate.<gateway id>.<model>.<suffix>``.
JOB_PREFIX = "fleetgate."
_TOKENISH = re.compile(r"^[A-Za-z0-9_.:/-]{1,300}$")
_RUNTIME = {"port": '"${FG_PORT}"', "host": '"${FG_HOST}"'}


def safe_name(text: str, limit: int = 60) -> str:
    """A name SLURM and file systems take as is: other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:limit] or "_"


def job_name(gateway_id: str, model: str, replica_id: str) -> str:
    suffix = replica_id[len(model) + 1 :] if replica_id.startswith(model + "-") else replica_id
    return f"{JOB_PREFIX}{gateway_id}.{safe_name(model)}.{safe_name(suffix, 40)}"


@dataclass(frozen=True)
class JobParams:
    model: str
    served_name: str
    replica_id: str
    job_name: str
    token: str
    log_path: str  # may contain %j (the job id)
    report_to: str  # the callback URL, or the discovery file's path


def render_arg(template: str, static: dict[str, str]) -> str:
    """One argument (or env value) as shell text: literals and known slots quoted, the
    node-only slots as quoted variable references."""
    out = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        if literal:
            out.append(shlex.quote(literal))
        if name is None:
            continue
        if name in _RUNTIME:
            out.append(_RUNTIME[name])
        else:
            out.append(shlex.quote(static[name]))
    return "".join(out) or "''"


def _literal(value: str) -> str:
    if not _TOKENISH.match(value):
        raise ValueError(f"refusing to put {value!r} into a job script")
    return json.dumps(value)


_CALLBACK = """\
import json, os, sys, time, urllib.error, urllib.request
url = {url}
body = json.dumps({{"replica": {replica}, "token": {token}, "host": sys.argv[1],
                   "port": int(sys.argv[2]), "job_id": os.environ.get("SLURM_JOB_ID", "")}})
err = None
for attempt in range(10):
    req = urllib.request.Request(url, body.encode(), {{"content-type": "application/json"}})
    try:
        with urllib.request.urlopen(req, timeout=10):
            sys.exit(0)
    except urllib.error.HTTPError as e:
        print(f"fleetgate: the gateway refused the callback: HTTP {{e.code}}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        err = e
        time.sleep(3)
print(f"fleetgate: cannot reach the gateway at {{url}}: {{err}}", file=sys.stderr)
sys.exit(1)
"""

_FILE = """\
import json, os, sys
path = {path}
doc = {{"replica": {replica}, "token": {token}, "host": sys.argv[1], "port": int(sys.argv[2]),
       "job_id": os.environ.get("SLURM_JOB_ID", "")}}
os.umask(0o077)
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path + ".tmp", "w") as f:
    json.dump(doc, f)
os.replace(path + ".tmp", path)
"""


def render(b: SlurmBackend, p: JobParams) -> str:
    """The whole job script, for ``sbatch --parsable`` on its standard input."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={p.job_name}", f"#SBATCH --output={p.log_path}"]
    opts = [
        ("partition", b.partition),
        ("qos", b.qos),
        ("account", b.account),
        ("gres", b.gres),
        ("cpus-per-task", None if b.cpus_per_task is None else str(b.cpus_per_task)),
        ("mem", b.mem),
        ("time", b.time_limit),
    ]
    lines += [f"#SBATCH --{k}={v}" for k, v in opts if v is not None]
    lines += [f"#SBATCH {opt}" for opt in b.sbatch_extra]
    lines += [
        f"# FleetGate replica {p.replica_id} of model {safe_name(p.model, 200)}; see docs/slurm.md",
    ]
    if b.setup:
        lines += ["# --- setup (as configured)", *b.setup, "# --- end of setup"]
    host = shlex.quote(b.bind_host) if b.bind_host else '"${FG_NODE}"'
    lines += [
        'FG_NODE="$(hostname)"',
        f"FG_HOST={host}",
        "FG_PORT=\"$(python3 -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); "
        "print(s.getsockname()[1])')\" || { echo 'fleetgate: cannot pick a free port "
        "(is python3 on the node?)' >&2; exit 97; }",
    ]
    static = {
        "model": p.model,
        "served_name": p.served_name,
        "model_path": b.model_path or "",
        "replica": p.replica_id,
        "log_dir": b.log_dir,
    }
    for k, v in b.env.items():
        lines.append(f"export {k}={render_arg(v, static)}")
    fields = {"replica": _literal(p.replica_id), "token": _literal(p.token)}
    if b.discovery == "callback":
        code = _CALLBACK.format(url=_literal(p.report_to), **fields)
    else:
        code = _FILE.format(path=_literal(p.report_to), **fields)
    lines += [
        'python3 - "${FG_NODE}" "${FG_PORT}" <<\'FLEETGATE_REPORT\' || exit 98',
        code.rstrip("\n"),
        "FLEETGATE_REPORT",
    ]
    parts = shlex.split(b.command) if isinstance(b.command, str) else list(b.command)
    lines.append("exec " + " ".join(render_arg(a, static) for a in parts))
    return "\n".join(lines) + "\n"
