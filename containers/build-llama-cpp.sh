#!/usr/bin/env bash
# Build llama.cpp's `llama-quantize` (needed for the K-quant GGUF exports q4_k_m, q5_k_m, q6_k)
# at a pinned version and install it into PREFIX/bin.
#
#   containers/build-llama-cpp.sh [--with-python] PREFIX
#
# --with-python also installs llama-cpp-python (the same pinned sdist, CPU build) into the Python
# environment at PREFIX (a virtualenv: PREFIX/bin/python): the tests then read every GGUF back with
# llama.cpp itself too (tokens and logits), not only with transformers' and gguf's readers.
#
# The llama.cpp sources come from the llama-cpp-python sdist on PyPI (it vendors llama.cpp),
# so the only network access needed is PyPI. Only the llama-quantize target is built, statically
# linked against ggml/llama, for a portable CPU (GGML_NATIVE=OFF): the binary can be copied into
# a container image or a shared directory and run on any x86-64/aarch64 node.
#
# Needs: cmake (>= 3.14), a C/C++17 compiler (g++), make or ninja, python3 with pip, tar.
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  pinned llama-cpp-python version (default 0.3.36)
#   LLAMA_CPP_SDIST           use this already downloaded sdist (.tar.gz) instead of pip download
#   LLAMA_CPP_SDIST_SHA256    expected sha256 of the sdist (known for the default version)
#   PYTHON                    python used for `pip download` (default python3)
#   JOBS                      parallel compile jobs (default: nproc)
#   KEEP_BUILD_DIR=1          keep the temporary build directory (printed at the end)
# Afterwards ftlib finds the binary on PATH (add PREFIX/bin), via FTLIB_LLAMA_QUANTIZE, or, with
# PREFIX=.venv, beside the python that runs ftlib. Re-running with the same version does nothing.
set -euo pipefail

WITH_PYTHON=0
if [[ "${1:-}" == --with-python ]]; then
    WITH_PYTHON=1
    shift
fi
if [[ $# -ne 1 || "$1" == -h || "$1" == --help ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi

PREFIX=$1
PINNED_VERSION=0.3.36
PINNED_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
VERSION=${LLAMA_CPP_PYTHON_VERSION:-$PINNED_VERSION}
if [[ "$VERSION" == "$PINNED_VERSION" ]]; then
    SHA256=${LLAMA_CPP_SDIST_SHA256:-$PINNED_SHA256}
else
    SHA256=${LLAMA_CPP_SDIST_SHA256:-}
fi
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

for tool in cmake tar; do
    command -v "$tool" >/dev/null || { echo "build-llama-cpp.sh: '$tool' not found (apt-get install cmake g++ make)" >&2; exit 1; }
done
command -v c++ >/dev/null || command -v g++ >/dev/null || { echo "build-llama-cpp.sh: no C++ compiler (apt-get install g++)" >&2; exit 1; }

mkdir -p "$PREFIX/bin"
PREFIX=$(cd "$PREFIX" && pwd)
# Idempotent: what was built from the same version is kept (a rebuild takes minutes).
STAMP="$PREFIX/bin/.llama-quantize.version"
NEED_QUANTIZE=1
if [[ -x "$PREFIX/bin/llama-quantize" && "$(cat "$STAMP" 2>/dev/null)" == "$VERSION" ]]; then
    echo "== $PREFIX/bin/llama-quantize (llama-cpp-python $VERSION) is already installed"
    NEED_QUANTIZE=0
fi
NEED_PYTHON=0
if [[ "$WITH_PYTHON" == 1 ]]; then
    [[ -x "$PREFIX/bin/python" ]] || { echo "build-llama-cpp.sh: --with-python needs a virtualenv at $PREFIX (no $PREFIX/bin/python)" >&2; exit 1; }
    if "$PREFIX/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
        echo "== llama-cpp-python $VERSION is already installed in $PREFIX"
    else
        NEED_PYTHON=1
    fi
fi
[[ "$NEED_QUANTIZE" == 1 || "$NEED_PYTHON" == 1 ]] || exit 0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-llama-cpp.XXXXXX")
cleanup() { if [[ "${KEEP_BUILD_DIR:-0}" != 1 ]]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT

start=$(date +%s)
if [[ -n "${LLAMA_CPP_SDIST:-}" ]]; then
    SDIST=$LLAMA_CPP_SDIST
else
    echo "== downloading llama-cpp-python==$VERSION sdist from PyPI"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$WORK/dl"
    SDIST=$(ls "$WORK"/dl/llama_cpp_python-"$VERSION".tar.gz)
fi
if [[ -n "$SHA256" ]]; then
    echo "$SHA256  $SDIST" | sha256sum --check --quiet - \
        || { echo "build-llama-cpp.sh: $SDIST does not have sha256 $SHA256" >&2; exit 1; }
fi
if [[ "$NEED_PYTHON" == 1 ]]; then
    echo "== installing llama-cpp-python $VERSION into $PREFIX (CPU build, no tools)"
    # Only the library the Python package needs; portable CPU code like llama-quantize's.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" "$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check \
        "$SDIST" >"$WORK/pip.log" 2>&1 || { tail -40 "$WORK/pip.log" >&2; exit 1; }
    "$PREFIX/bin/python" -c "import llama_cpp; print('== installed llama-cpp-python', llama_cpp.__version__)"
fi
[[ "$NEED_QUANTIZE" == 1 ]] || exit 0

echo "== extracting vendored llama.cpp from $(basename "$SDIST")"
tar -xzf "$SDIST" -C "$WORK" --wildcards "llama_cpp_python-$VERSION/vendor/llama.cpp/*"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -f "$SRC/tools/quantize/main.cpp" ]] || { echo "build-llama-cpp.sh: $SRC has no tools/quantize" >&2; exit 1; }

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

echo "== configuring (static, GGML_NATIVE=OFF, CPU only)"
cmake -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF \
    -DGGML_OPENMP=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_NUMBER=0 \
    -DLLAMA_BUILD_COMMIT="llama-cpp-python-$VERSION" \
    >"$WORK/configure.log" 2>&1 || { tail -40 "$WORK/configure.log" >&2; exit 1; }

echo "== building llama-quantize with $JOBS jobs"
cmake --build "$WORK/build" --target llama-quantize -j "$JOBS" >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log" >&2; exit 1; }

BIN=$(find "$WORK/build" -type f -name llama-quantize -perm -u+x | head -n 1)
[[ -n "$BIN" ]] || { echo "build-llama-cpp.sh: llama-quantize was not produced" >&2; exit 1; }
# Atomic install: copy beside the target, then rename.
install -m 0755 "$BIN" "$PREFIX/bin/.llama-quantize.tmp"
mv -f "$PREFIX/bin/.llama-quantize.tmp" "$PREFIX/bin/llama-quantize"

# Smoke test: prints its usage with the K-quant types it knows.
usage=$("$PREFIX/bin/llama-quantize" --help 2>&1 || true)  # prints usage and exits 1
if [[ "$usage" != *Q4_K_M* ]]; then
    echo "build-llama-cpp.sh: $PREFIX/bin/llama-quantize does not run" >&2
    exit 1
fi
echo "$VERSION" > "$STAMP.tmp" && mv -f "$STAMP.tmp" "$STAMP"
echo "== installed $PREFIX/bin/llama-quantize (llama-cpp-python $VERSION) in $(( $(date +%s) - start )) s"
[[ "${KEEP_BUILD_DIR:-0}" == 1 ]] && echo "== build directory kept: $WORK"
exit 0
