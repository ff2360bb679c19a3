#!/usr/bin/env bash
# install-stack.sh PYTHON [FTLIB_SRC]: install ftlib's pinned stack (containers/requirements.txt,
# beside this script) into the environment of PYTHON (a venv's python), then ftlib from FTLIB_SRC
# (a directory with pyproject.toml) without dependencies, then `pip check`.
#
# Every image recipe runs this with the same requirements.txt, so that they install the same
# package set: containers/build.sh (in a chroot), containers/ftlib.def (%post) and
# containers/Dockerfile.
#
#   FTLIB_TORCH   the torch requirement instead of requirements.txt's pin, with any pip options,
#                 e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
#                 (PyPI's torch==2.13.0 is a CUDA 13.0 build; this machine's pip finds a CPU one)
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 PYTHON [FTLIB_SRC]" >&2
    exit 2
fi
py=$1
src=${2:-}
req=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/requirements.txt
[ -f "$req" ] || { echo "install-stack.sh: $req is missing" >&2; exit 2; }

# pins STAGE: the NAME==VERSION lines of a stage ("" is the main one)
pins() {
    awk -v want="$1" '
        /^[ \t]*(#|$)/ { next }
        { stage = ""; if (match($0, /#[ \t]*stage:[ \t]*[A-Za-z]+/)) { stage = substr($0, RSTART, RLENGTH); sub(/.*:[ \t]*/, "", stage) }
          if (stage == want) print $1 }' "$req"
}
pip() { "$py" -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore "$@"; }

echo "== install-stack: tools"
pip $(pins tools)
echo "== install-stack: ${FTLIB_TORCH:-$(pins torch)}"
# shellcheck disable=SC2086  # FTLIB_TORCH may carry pip options: split on purpose
pip ${FTLIB_TORCH:-$(pins torch)}
torch_version=$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))')
echo "== install-stack: the stack (keeping torch $torch_version)"
pip "torch==$torch_version" $(pins "")
echo "== install-stack: deepspeed (no ops built: they are JIT-compiled on first use)"
DS_BUILD_OPS=0 pip --no-build-isolation "torch==$torch_version" $(pins deepspeed)
if [ -n "$src" ]; then
    echo "== install-stack: ftlib from $src"
    pip --no-deps --no-build-isolation "$src"
fi
"$py" -m pip check
