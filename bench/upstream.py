"""The fixed-response upstream for scenarios 1, 2, 5 and 6: nginx answering one JSON body.

nginx is the upstream because it costs next to nothing per request (``return 200``), so every
path's own cost shows. Its config is generated into a scratch directory: loopback only, one
worker process (the box has 2 cores, and wrk and the path under test need them), access log
off, keep-alive connections that are never recycled during a run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL = "demo"

# A real chat completion, as vLLM would send it, usage included (the gateway reads it).
BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    },
    separators=(",", ":"),
)

# The small chat request every path is posted.
REQUEST = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16},
    separators=(",", ":"),
).encode()


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise FileNotFoundError("nginx is not installed (bench/run installs Debian's nginx)")
    return found


def nginx_conf(prefix: Path, port: int) -> Path:
    """Write an nginx.conf under ``prefix`` and return its path."""
    assert "'" not in BODY and "$" not in BODY  # it sits in a single-quoted nginx string
    for d in ("logs", "tmp"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{BODY}';
        }}
    }}
}}
"""
    )
    return conf


def nginx_argv(prefix: Path, port: int) -> list[str]:
    conf = nginx_conf(prefix, port)
    return [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
