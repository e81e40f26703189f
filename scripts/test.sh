#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs them.
# This is the README's test command, and what CI runs (.ci/run calls it).
#
#   bash scripts/test.sh                 # everything, the real-vLLM tier included
#   bash scripts/test.sh tests/api -x    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
echo "== installing FleetGate and its test dependencies"
"$PY" -m pip install --quiet --disable-pip-version-check -e '.[test]'

echo "== installing Debian packages the tests drive: PostgreSQL (store), Redis (limits), wrk and nginx (bench smoke tests), SLURM, munge and sshd (tests/slurm)"
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)  # tests/server/test_nginx.py: HTTP/2 through nginx
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
# The SLURM tier (tests/slurm) starts its own single-node cluster and an sshd on loopback.
[ -x /usr/sbin/slurmctld ] || missing+=(slurmctld)
[ -x /usr/sbin/slurmd ] || missing+=(slurmd)
command -v sbatch >/dev/null || missing+=(slurm-client)
[ -x /usr/sbin/munged ] || missing+=(munge)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
# tests/test_deploy.py validates compose.yaml with `docker-compose config` (no engine needed).
command -v docker-compose >/dev/null || missing+=(docker-compose)
# tests/portal: a real OpenLDAP server (slapd, ldap-utils) and a real browser (Debian's chromium,
# driven by Playwright from PyPI; a downloaded browser can't be fetched here).
[ -x /usr/sbin/slapd ] || missing+=(slapd)
command -v ldapsearch >/dev/null || missing+=(ldap-utils)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "missing: ${missing[*]}; install them (apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi

echo "== installing vLLM (CPU build) for the real tier, in its own virtualenv"
bash scripts/install-vllm.sh

echo "== lint and types"
"$PY" -m ruff check fleetgate tests
"$PY" -m mypy fleetgate

echo "== tests"
set +e
"$PY" -m pytest -p no:cacheprovider -q -rs "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
if [ "$rc" -ne 0 ] || [ "$#" -gt 0 ]; then
    exit "$rc"  # (with arguments, only what they asked for)
fi

# The compiled build (setup.py, FLEETGATE_USE_MYPYC=1): the same request path compiled by mypyc,
# what bench/run measures. Its modules are built in a copy of this checkout, never in it (a
# stale extension would shadow an edited .py), and the tests that drive them run again from
# there; those marked `pure` check the Python build's insides (patches, fakes) and stay out.
echo "== the compiled build: mypyc, then the request path's tests against it"
COMPILED_DIR="$(mktemp -d /tmp/fleetgate-compiled.XXXXXX)"
trap 'rm -rf "$COMPILED_DIR"' EXIT
PYTHON="$PY" bash scripts/compiled.sh "$COMPILED_DIR/src"
cd "$COMPILED_DIR/src"
PYTHONPATH="$COMPILED_DIR/src" FLEETGATE_EXPECT_COMPILED=1 \
    "$PY" -m pytest -p no:cacheprovider -q -rs -m "not pure" tests/test_compiled.py \
    tests/server tests/dataplane tests/proxy tests/limits tests/fleet tests/api tests/auth \
    tests/store/test_usage_insert.py tests/store/test_usage_rows.py \
    tests/test_openai_client.py tests/test_limits_e2e.py tests/test_limits_multi.py \
    tests/test_usage_durability.py tests/test_error_envelope.py tests/test_identity_e2e.py
