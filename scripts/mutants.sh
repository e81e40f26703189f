#!/usr/bin/env bash
# Mutation testing of the auth code (mutmut), on a copy of the tree.
#
#   scripts/mutants.sh [DEST]          # DEST defaults to /tmp/fleetgate-mutants
#   MUTANTS_SET=limits scripts/mutants.sh /tmp/fleetgate-mutants-limits   # admission instead
#   MUTANTS_SET=server scripts/mutants.sh /tmp/fleetgate-mutants-server   # the front door's parsing
#   MUTANTS_SET=accounting scripts/mutants.sh /tmp/fleetgate-mutants-acct # the usage tap
#   MUTANTS_SET=upstream scripts/mutants.sh /tmp/fleetgate-mutants-up     # the upstream client
#
# mutmut rewrites the code it mutates, so it never runs in the checkout: the tracked and
# untracked (not ignored) files are copied to DEST, the mutmut settings are written to DEST's
# setup.cfg, and mutmut runs there. Only the fast, in-process module tests run against the
# mutants (no test that starts a process; the PostgreSQL half of the store tests is skipped).
# Every mutant's test run is bounded by mutmut's timeout (15x the tests' own duration, +1 s),
# and the whole run by MUTANTS_TIMEOUT_S (default 3600). Prints mutmut's summary and writes
# the behaviour-changing survivors to DEST/survivors.txt (scripts/mutants_report.py).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-/tmp/fleetgate-mutants}
case "$(cd "$(dirname "$dest")" && pwd)/$(basename "$dest")" in
  "$repo"|"$repo"/*) echo "refusing to run mutmut inside the checkout ($dest)" >&2; exit 2 ;;
esac

rm -rf "$dest"
mkdir -p "$dest"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' _ \
  | tar --null -T - -cf -) | tar -xf - -C "$dest"

# mutmut reads [tool.mutmut] from pyproject.toml when there is one, else setup.cfg: the copy's
# pyproject.toml loses that table, so the settings below are the ones that apply.
python3 - "$dest/pyproject.toml" <<'PY'
import re, sys
p = sys.argv[1]
text = open(p, encoding="utf-8").read()
open(p, "w", encoding="utf-8").write(re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text))
PY
# process_isolation=forkserver: workers fork from a process that only collected the tests.
# Forked from the process that ran them (mutmut's default), they inherit caches the original
# code filled (access._shared's lru_cache of compiled allow-lists), and a mutant of the
# pattern compiler "survived" without ever running.
case "${MUTANTS_SET:-auth}" in
  auth)
    mutate=(fleetgate/auth/keys.py fleetgate/auth/authn.py fleetgate/auth/access.py
            fleetgate/auth/principals.py fleetgate/services/authz.py fleetgate/services/users.py
            fleetgate/services/groups.py fleetgate/services/keys.py fleetgate/services/audit.py
            fleetgate/services/validation.py fleetgate/dataplane/request.py
            fleetgate/dataplane/express.py
            fleetgate/api/routing.py fleetgate/errors.py)
    tests=(tests/auth tests/services tests/dataplane tests/api/test_routing.py
           tests/api/test_routing_mutants.py tests/test_error_envelope.py)
    select=() ;;
  limits)
    # Admission's decisions (who gets in, what is counted, what the headers say) in the memory
    # backend and the pure modules around it, against the in-process limits tests; the Redis
    # half of the shared contract tests is deselected (no server per mutant).
    mutate=(fleetgate/limits/memory.py fleetgate/limits/backend.py fleetgate/limits/buckets.py
            fleetgate/limits/headers.py fleetgate/limits/spec.py fleetgate/limits/quotas.py)
    tests=(tests/limits/test_memory_backend.py tests/limits/test_memory_admission.py
           tests/limits/test_backends.py
           tests/limits/test_buckets.py tests/limits/test_limits_spec.py
           tests/limits/test_quotas.py)
    select=(-k "not redis") ;;
  server)
    # The front door: what the server lets through to the app and what it refuses (framing,
    # head and body bounds, timeouts, response-header checks), against the in-process server
    # tests and the express path's (the real server on loopback, no subprocess).
    mutate=(fleetgate/server/protocol.py fleetgate/server/wire.py)
    tests=(tests/server/test_http11.py tests/server/test_wire.py tests/server/test_fuzz.py
           tests/server/test_front_door.py tests/dataplane/test_express.py)
    select=() ;;
  accounting)
    # Reading token usage off the responses as they pass (what every request is charged),
    # against the usage tap's and the relay's in-process tests.
    # And the usage writer's flattening of those records for the store.
    mutate=(fleetgate/proxy/usage_tap.py fleetgate/store/usage_rows.py)
    tests=(tests/proxy/test_usage_tap.py tests/proxy/test_relay.py tests/proxy/test_relay_fuzz.py
           tests/store/test_usage_rows.py tests/store/test_usage_insert.py)
    select=() ;;
  upstream)
    # The client of the model servers: framing and bounds of what an upstream answers (odd
    # statuses, bad framing, oversized heads and bodies, silence, hang-ups), against its tests.
    mutate=(fleetgate/proxy/client.py)
    tests=(tests/proxy/test_client.py tests/proxy/test_relay.py tests/dataplane/test_express.py)
    select=() ;;
  *) echo "MUTANTS_SET is auth (the default), limits, server, accounting or upstream, not ${MUTANTS_SET}" >&2
     exit 2 ;;
esac
{
  printf '[mutmut]\nprocess_isolation=forkserver\nsource_paths=fleetgate/\nonly_mutate=\n'
  printf '    %s\n' "${mutate[@]}"
  printf 'pytest_add_cli_args_test_selection=\n'
  printf '    %s\n' "${tests[@]}"
  printf 'pytest_add_cli_args=\n'
  printf '    %s\n' -p no:cacheprovider -q "${select[@]}"
} >"$dest/setup.cfg"

cd "$dest"
export FLEETGATE_SKIP_POSTGRES=1
# MUTANTS_ONLY: mutmut's mutant-name globs, space-separated, to run part of a set (e.g.
# "fleetgate.server.protocol.xǁHttpProtocolǁon_header__mutmut_*"); all of it when unset.
read -r -a only <<<"${MUTANTS_ONLY:-}"
timeout "${MUTANTS_TIMEOUT_S:-3600}" python -m mutmut run --max-children "${MUTANTS_JOBS:-2}" \
  "${only[@]}"
python "$repo/scripts/mutants_report.py"
echo "one mutant's diff: (cd $dest && python -m mutmut show NAME)"
