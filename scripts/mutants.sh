#!/usr/bin/env bash
# Mutation testing of the auth code (mutmut), on a copy of the tree.
#
#   scripts/mutants.sh [DEST]          # DEST defaults to /tmp/fleetgate-mutants
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
cat >"$dest/setup.cfg" <<'CFG'
[mutmut]
process_isolation=forkserver
source_paths=fleetgate/
only_mutate=
    fleetgate/auth/keys.py
    fleetgate/auth/authn.py
    fleetgate/auth/access.py
    fleetgate/auth/principals.py
    fleetgate/services/authz.py
    fleetgate/services/users.py
    fleetgate/services/groups.py
    fleetgate/services/keys.py
    fleetgate/services/audit.py
    fleetgate/services/validation.py
    fleetgate/dataplane/request.py
    fleetgate/api/routing.py
    fleetgate/errors.py
pytest_add_cli_args_test_selection=
    tests/auth
    tests/services
    tests/dataplane
    tests/api/test_routing.py
    tests/api/test_routing_mutants.py
    tests/test_error_envelope.py
pytest_add_cli_args=
    -p
    no:cacheprovider
    -q
CFG

cd "$dest"
export FLEETGATE_SKIP_POSTGRES=1
timeout "${MUTANTS_TIMEOUT_S:-3600}" python -m mutmut run --max-children "${MUTANTS_JOBS:-2}"
python "$repo/scripts/mutants_report.py"
echo "one mutant's diff: (cd $dest && python -m mutmut show NAME)"
