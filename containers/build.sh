#!/usr/bin/env bash
# build.sh [IMAGE.sif]: build ftlib's job image on this machine (Debian 12, as root) with Apptainer.
#
# Default IMAGE: ftlib.sif in the repository root. Set container.image to it.
#
#   1. the stack root filesystem: Debian 12 (debootstrap minbase) with python3, a venv at /opt/venv
#      and the pinned stack, installed in a chroot by containers/install-stack.sh from
#      containers/requirements.txt (the same script and list as containers/ftlib.def);
#      cached in $FTLIB_IMAGE_CACHE/stack-<key>/ (key: the list, the script, this file, FTLIB_TORCH),
#      so a change of ftlib's source alone does not redo it (~4 min when it does);
#   2. a copy of it with ftlib's source in /opt/ftlib (installed into the venv, --no-deps),
#      llama.cpp's llama-quantize in /opt/llama.cpp/bin and the image marker /opt/ftlib/image.json;
#      no device node;
#   3. `apptainer build` of that directory through a generated definition (Bootstrap: localimage)
#      that takes %environment, %runscript, %test, %help and %labels from containers/ftlib.def, so
#      the image behaves as one built from ftlib.def; then `apptainer test` (the %test: the
#      self-test, containers/self-test.py) on it; then a rename onto IMAGE (atomic).
#
# Beside IMAGE it writes IMAGE.sha256 (sha256sum format) and IMAGE.inputs-sha256: the hash of the
# inputs (the stack key, ftlib's source, containers/ftlib.def, the quantizer binary, the squashfs
# options). When IMAGE exists and its inputs hash is that of the tree, nothing is rebuilt (set
# FTLIB_IMAGE_REBUILD=1 to force). Prints `image: IMAGE` and `sha256: DIGEST` last.
#
# llama-quantize is copied, not compiled in the image: it is the static, portable (GGML_NATIVE=OFF)
# binary that containers/build-llama-cpp.sh builds on this same Debian 12 (CI builds it into
# .venv/bin anyway), which saves a C++ toolchain in the image and ~5 minutes of compiling.
# Found as: $FTLIB_LLAMA_QUANTIZE, .venv/bin/llama-quantize, llama-quantize on PATH, or else
# built with containers/build-llama-cpp.sh into the cache (needs cmake and g++).
#
# torch: the CPU build this machine's pip finds (its pip configuration and the local wheel and
# index directories it names are bound read-only into the chroot). On a GPU build host:
# FTLIB_TORCH="torch==2.13.0" with PyPI as the index gives the CUDA 13.0 build.
#
# A cluster's build host (no debootstrap, not root) builds containers/ftlib.def instead:
#   apptainer build --fakeroot ftlib.sif containers/ftlib.def     (from the repository root)
#
# Needs: root, apptainer on PATH (containers/install-apptainer.sh on a development machine),
# debootstrap, squashfs-tools and util-linux (installed when missing), python3, network access to
# the Debian archive and PyPI. Environment:
#   FTLIB_IMAGE_CACHE      cache directory (default /var/tmp/ftlib-images)
#   FTLIB_TORCH            torch requirement (and pip options) instead of the pin
#   FTLIB_DEBIAN_MIRROR    default http://deb.debian.org/debian
#   FTLIB_MKSQUASHFS_ARGS  default "-comp zstd -Xcompression-level 3" (fast; kernels >= 4.14
#                          read it); set to "" for apptainer's default gzip
#   FTLIB_IMAGE_REBUILD=1  rebuild even if IMAGE is up to date
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
out=$(realpath -m "${1:-$repo/ftlib.sif}")
cache=$(realpath -m "${FTLIB_IMAGE_CACHE:-/var/tmp/ftlib-images}")
suite=bookworm
mirror=${FTLIB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
torch_req=${FTLIB_TORCH:-}
squash_args=${FTLIB_MKSQUASHFS_ARGS--comp zstd -Xcompression-level 3}
packages=python3,python3-venv,ca-certificates
say() { echo "build.sh: $*" >&2; }
start=$(date +%s)

if ! command -v apptainer >/dev/null 2>&1; then
    say "error: apptainer is not on PATH. On a development or CI machine: containers/install-apptainer.sh;" \
        "on a cluster, load its apptainer module. Or build containers/Dockerfile with docker/podman/ch-image instead."
    exit 127
fi
for path in pyproject.toml ftlib jobs configs containers/ftlib.def containers/requirements.txt \
            containers/install-stack.sh containers/self-test.py containers/build-llama-cpp.sh; do
    if [ ! -e "$repo/$path" ]; then
        say "error: $repo/$path is missing; the image is built from it"
        exit 2
    fi
done
if [ "$(id -u)" != 0 ]; then
    say "error: needs root (debootstrap, chroot). Not root? Build containers/ftlib.def on a build host:" \
        "apptainer build --fakeroot IMAGE.sif containers/ftlib.def"
    exit 3
fi
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
command -v unshare >/dev/null && command -v flock >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi
mkdir -p "$cache" "$(dirname "$out")"
# The whole build runs in a private mount namespace: every mount it makes (debootstrap's proc,
# the chroot's binds, the image's overlay) ends with it, whatever way the build ends.
if [ "${FTLIB_BUILD_NAMESPACE:-}" != "$$" ]; then
    exec unshare --mount --propagation private -- \
        /bin/bash -c 'FTLIB_BUILD_NAMESPACE=$$ exec /bin/bash "$0" "$@"' "$here/build.sh" "$@"
fi

# --- llama.cpp's quantizer (see above) ---------------------------------------------------------
quantize=${FTLIB_LLAMA_QUANTIZE:-}
if [ -z "$quantize" ]; then
    for candidate in "$repo/.venv/bin/llama-quantize" "$(command -v llama-quantize || true)" \
                     "$cache/llama.cpp/bin/llama-quantize"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then quantize=$candidate; break; fi
    done
fi
if [ -z "$quantize" ]; then
    say "no llama-quantize found; building it with containers/build-llama-cpp.sh into $cache/llama.cpp"
    py=python3
    [ -x "$repo/.venv/bin/python" ] && py=$repo/.venv/bin/python
    PYTHON=$py bash "$here/build-llama-cpp.sh" "$cache/llama.cpp" >&2
    quantize=$cache/llama.cpp/bin/llama-quantize
fi
quantize=$(realpath "$quantize")
if ldd "$quantize" 2>/dev/null | grep -v -E '=> /(usr/)?lib/|linux-vdso|ld-linux' | grep -q '=>'; then
    say "error: $quantize links libraries outside the system's (ldd below); build it with containers/build-llama-cpp.sh"
    ldd "$quantize" >&2
    exit 2
fi

# --- what the image is made of -----------------------------------------------------------------
sha() { sha256sum | cut -d' ' -f1; }
source_sha=$(python3 "$here/self-test.py" --source-sha256 "$repo")
# The stack's key: the list, its installer, stage 1 of this script (between its two markers below)
# and its settings; editing the rest of this file does not redo the stack.
stack_key=$( { cat "$here/requirements.txt" "$here/install-stack.sh"; \
               sed -n '/^# --- 1\. the stack/,/^# --- 2\. the image/p' "$here/build.sh"; \
               printf 'suite=%s\npackages=%s\ntorch=%s\n' "$suite" "$packages" "$torch_req"; } | sha)
inputs_of() {   # inputs_of SOURCE_SHA256
    { printf 'stack=%s\nsource=%s\nsquash=%s\nquantize=' "$stack_key" "$1" "$squash_args"; \
      sha < "$quantize"; cat "$here/ftlib.def"; } | sha
}
inputs=$(inputs_of "$source_sha")

up_to_date() {
    [ "${FTLIB_IMAGE_REBUILD:-0}" != 1 ] && [ -f "$out" ] && [ -f "$out.sha256" ] \
        && [ "$(cat "$out.inputs-sha256" 2>/dev/null)" = "$inputs" ]
}
report() {
    echo "image: $out"
    echo "sha256: $(cut -d' ' -f1 "$out.sha256")"
}
if up_to_date; then
    say "$out is up to date (inputs $inputs)"
    report
    exit 0
fi

# One build at a time per cache (the stack directory is shared); then look again.
exec 9>"$cache/.lock"
flock -n 9 || { say "waiting for another build to release $cache/.lock"; flock 9; }
if up_to_date; then
    say "$out was built meanwhile (inputs $inputs)"
    report
    exit 0
fi

work=$(mktemp -d "$cache/work.XXXXXX")
tmp_sif="$out.building.$$"
# Every mount (debootstrap's, in_chroot's) is made in a private mount namespace and ends with it;
# still, never delete a tree that something is mounted in.
cleanup() {
    umount -R "$work/rootfs" 2>/dev/null || true
    if awk -v w="$work/" 'index($2 "/", w) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
        say "error: something is still mounted under $work; left in place (umount -R it, then remove it)"
    else
        rm -rf "$work"
    fi
    rm -f "$tmp_sif"
}
trap cleanup EXIT

# Host paths the chroot's pip needs to behave as this machine's pip: its configuration files
# (global and root's own: HOME is /root in the chroot too), the local wheel and index directories
# they and PIP_* name, the CA bundle. Bound read-only at the same paths.
pip_host_paths() {
    local files=(/etc/pip.conf /etc/xdg/pip "${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf"
                 "$HOME/.pip/pip.conf" "${PIP_CONFIG_FILE:-}")
    {
        printf '%s\n' "${files[@]}"
        for f in "${files[@]}"; do
            [ -n "$f" ] && [ -e "$f" ] && grep -rhoE '(file://)?/[^[:space:],"'"'"']+' "$f" 2>/dev/null
        done
        env | grep -E '^PIP_' | cut -d= -f2- | grep -oE '(file://)?/[^[:space:],"'"'"']+'
    } | sed -e 's|^file://||' -e 's|/simple/*$||' | while read -r p; do
        [ -n "$p" ] && [ -e "$p" ] && realpath "$p"
    done | sort -u | awk '{ for (i = 1; i <= n; i++) if (index($0, kept[i] "/") == 1) next; kept[++n] = $0; print }'
}

# in_chroot ROOT COMMAND...: run COMMAND in ROOT, in a private mount namespace (proc, the host's
# /dev and resolv.conf, pip's host paths read-only): every mount ends with the command.
in_chroot() {
    local root=$1
    shift
    local binds=()
    mapfile -t binds < <(pip_host_paths)
    unshare --mount --propagation private -- /bin/bash -euc '
        root=$1; nbinds=$2; shift 2
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        touch "$root/etc/resolv.conf" && mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
        for ((i = 0; i < nbinds; i++)); do
            src=$1; shift
            if [ -d "$src" ]; then mkdir -p "$root$src"; else mkdir -p "$(dirname "$root$src")"; touch "$root$src"; fi
            mount --bind "$src" "$root$src" && mount -o remount,bind,ro "$root$src"
        done
        exec chroot "$root" /usr/bin/env -u PYTHONPATH -u VIRTUAL_ENV \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"
    ' in_chroot "$root" "${#binds[@]}" "${binds[@]}" "$@"
}

# Bind mounts live in in_chroot's own mount namespace only, so this never reaches the host's /dev.
delete_special_files() {
    find "$1" -xdev \( -type b -o -type c -o -type p -o -type s \) -delete
}

# --- 1. the stack root filesystem (cached) -----------------------------------------------------
stack=$cache/stack-$stack_key
if [ -f "$stack/.complete" ]; then
    say "stack root filesystem: cached ($stack)"
else
    say "stack root filesystem: debootstrap $suite minbase + $packages (~2 min)"
    t0=$(date +%s)
    new="$work/stack"
    unshare --mount --propagation private -- \
        debootstrap --variant=minbase --include="$packages" "$suite" "$new/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
    say "debootstrap took $(( $(date +%s) - t0 )) s; installing the pinned stack (containers/install-stack.sh)"
    t0=$(date +%s)
    mkdir -p "$new/rootfs/opt/ftlib-stack"
    cp "$here/requirements.txt" "$here/install-stack.sh" "$new/rootfs/opt/ftlib-stack/"
    in_chroot "$new/rootfs" python3 -m venv /opt/venv
    FTLIB_TORCH=$torch_req in_chroot "$new/rootfs" /bin/bash /opt/ftlib-stack/install-stack.sh /opt/venv/bin/python \
        >"$work/stack.log" 2>&1 || { tail -40 "$work/stack.log" >&2; exit 1; }
    say "stack installed in $(( $(date +%s) - t0 )) s"
    rm -rf "$new/rootfs/opt/ftlib-stack" "$new/rootfs/root/.cache" "$new/rootfs/var/cache/apt/archives/"*.deb \
           "$new/rootfs/var/lib/apt/lists/"* "$new/rootfs/tmp/"* 
    delete_special_files "$new/rootfs"
    date -u +%Y-%m-%dT%H:%M:%SZ > "$new/.complete"
    for old in "$cache"/stack-*; do [ -e "$old" ] && [ "$old" != "$stack" ] && rm -rf "$old"; done
    rm -rf "$stack"
    mv "$new" "$stack"
fi

# --- 2. the image's root filesystem ------------------------------------------------------------
say "image root filesystem: the stack + ftlib (source $source_sha) + llama-quantize"
# An overlay on the cached stack (which stays as it is): only ftlib's files are written.
rootfs=$work/rootfs
mkdir -p "$rootfs" "$work/upper" "$work/overlay-work"
mount -t overlay overlay -o "lowerdir=$stack/rootfs,upperdir=$work/upper,workdir=$work/overlay-work" "$rootfs"
mkdir -p "$rootfs/opt/ftlib/containers" "$rootfs/opt/llama.cpp/bin"
python3 "$here/self-test.py" --source-files "$repo" | tar -C "$repo" --ignore-failed-read -cf - --files-from=- | tar -C "$rootfs/opt/ftlib" -xf -
cp "$here/ftlib.def" "$here/build.sh" "$here/build-llama-cpp.sh" "$rootfs/opt/ftlib/containers/"
# The image holds this copy: if the tree changed since the start, the copy's digest is what counts.
copied=$(python3 "$here/self-test.py" --source-sha256 "$rootfs/opt/ftlib")
if [ "$copied" != "$source_sha" ]; then
    say "the source changed during the build: the image holds source $copied"
    source_sha=$copied
    inputs=$(inputs_of "$source_sha")
fi
install -m 0755 "$quantize" "$rootfs/opt/llama.cpp/bin/llama-quantize"
in_chroot "$rootfs" /opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check \
    --root-user-action=ignore --no-deps --no-build-isolation /opt/ftlib >"$work/ftlib.log" 2>&1 \
    || { tail -30 "$work/ftlib.log" >&2; exit 1; }
in_chroot "$rootfs" /opt/venv/bin/python -m pip check >&2
rm -rf "$rootfs/opt/ftlib/build" "$rootfs/opt/ftlib/"*.egg-info
in_chroot "$rootfs" /opt/venv/bin/python /opt/ftlib/containers/self-test.py --write-marker containers/build.sh \
    "inputs_sha256=$inputs" "torch_requirement=$torch_req" "base=debian:$suite (debootstrap minbase)" >&2
inside=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["source_sha256"])' "$rootfs/opt/ftlib/image.json")
[ "$inside" = "$source_sha" ] || { say "error: the image's source digest $inside is not the tree's $source_sha"; exit 1; }
rm -rf "$rootfs/root/.cache" "$rootfs/tmp/"*
delete_special_files "$rootfs"

# --- 3. the SIF ----------------------------------------------------------------------------------
# ftlib.def's runtime sections, its labels without those that describe its CUDA base, and the
# pins as labels (ftlib.def's %post adds the same ones).
def=$work/ftlib-local.def
{
    printf 'Bootstrap: localimage\nFrom: %s\n\n' "$rootfs"
    awk '/^%[a-z]+/ { keep = ($1 == "%environment" || $1 == "%runscript" || $1 == "%test" || $1 == "%help") }
         keep' "$here/ftlib.def"
    echo
    echo "%labels"
    awk '/^%[a-z]+/ { keep = ($1 == "%labels"); next }
         keep && $1 !~ /^ftlib\.(base|cuda|nvidia-driver-min)$/' "$here/ftlib.def"
    printf '    ftlib.base debian:%s (debootstrap minbase, containers/build.sh)\n' "$suite"
    printf '    ftlib.inputs-sha256 %s\n' "$inputs"
    printf '    ftlib.source-sha256 %s\n' "$source_sha"
    sed -n 's/^\([A-Za-z0-9._-]*\)==\([^ #]*\).*/    ftlib.pin.\1 \2/p' "$here/requirements.txt"
} > "$def"
export APPTAINER_TMPDIR=$work APPTAINER_CACHEDIR=$cache/apptainer-cache
say "apptainer build $tmp_sif (mksquashfs ${squash_args:-default})"
t0=$(date +%s)
args=(--notest)   # the %test runs on the finished image below (`apptainer test`), as anywhere
[ -n "$squash_args" ] && args+=(--mksquashfs-args "$squash_args")
apptainer build "${args[@]}" "$tmp_sif" "$def" >"$work/apptainer-build.log" 2>&1 \
    || { tail -30 "$work/apptainer-build.log" >&2; exit 1; }
say "apptainer build took $(( $(date +%s) - t0 )) s; running the image's %test"
umount "$rootfs"
apptainer test --cleanenv --contain "$tmp_sif" >&2

rm -f "$out.inputs-sha256"   # no moment where the old inputs hash names the new image
mv -f "$tmp_sif" "$out"
digest=$(sha < "$out")
printf '%s  %s\n' "$digest" "$(basename "$out")" > "$out.sha256.tmp" && mv -f "$out.sha256.tmp" "$out.sha256"
echo "$inputs" > "$out.inputs-sha256.tmp" && mv -f "$out.inputs-sha256.tmp" "$out.inputs-sha256"
say "built $out ($(du -h "$out" | cut -f1)) in $(( $(date +%s) - start )) s"
report
