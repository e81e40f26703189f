#!/usr/bin/env bash
# A compiled copy of this checkout: the tracked files copied to DIR, and the request path's
# modules (setup.py's COMPILED) built there in place with mypyc. Run from it with
# PYTHONPATH=DIR; the tests' second pass (scripts/test.sh) and bench/run use it.
#
#   bash scripts/compiled.sh /tmp/fleetgate-compiled
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:?usage: scripts/compiled.sh DIR}"
PY="${PYTHON:-python3}"
rm -rf "$DEST"
mkdir -p "$DEST"
# The working tree's tracked and untracked-but-not-ignored files: what is being tested.
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$DEST"
cd "$DEST"
FLEETGATE_USE_MYPYC=1 "$PY" setup.py -q build_ext --inplace -j 2 >build.log 2>&1 || {
    tail -40 build.log >&2
    echo "scripts/compiled.sh: the mypyc build failed (build.log above)" >&2
    exit 1
}
n=$(find fleetgate -name '*.so' | wc -l)
echo "compiled: $n modules in $DEST"
