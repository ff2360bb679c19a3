#!/usr/bin/env bash
# make-test-image.sh DIR: a small Charliecloud directory image for ftlib's tests on a CPU machine.
#
# THIS IS A TEST IMAGE. Jobs run in the image built by containers/build.sh or from
# containers/ftlib.def (Apptainer) or containers/Dockerfile (enroot/pyxis, Charliecloud). This one
# exists so that tests can run ftlib's Charliecloud launch (ch-run, binds, environment filtering)
# with this machine's python in well under a second, without building the job image.
#
# The image is a skeleton (a few KB, made in well under a second): the host's /usr, the
# interpreter's prefix and the venv are not copied but bound in by ch-run at the same paths.
# DIR holds the empty bind targets for them, /bin, /lib ... as the host has them (symlinks into
# /usr on a merged-/usr system), what the loader and ch-run need from /etc, empty /dev, /proc,
# /sys, /tmp, /home mount targets, and no device node. It lists the host paths to bind, one per
# line, in DIR/ch/host-binds: a test adds them to container.binds. ch-run (0.31) has no read-only
# bind, so these are writable by a process inside as by the same user outside; the image itself
# is mounted read-only. /ch/environment sets PATH so that `python3` is the venv's interpreter.
#
#   FTLIB_TEST_PYTHON  the interpreter (a venv's) the image runs; default: python3 on PATH
#
# ch-run comes from Debian's charliecloud-runtime package; it is installed when missing and this
# runs as root with apt-get. Prints DIR on success; rebuilds DIR from scratch every time.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 DIR   (makes a Charliecloud test image directory at DIR)" >&2
    exit 2
fi
dir=$(realpath -m "$1")
python=${FTLIB_TEST_PYTHON:-python3}

if ! command -v ch-run >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "make-test-image: ch-run missing; installing Debian's charliecloud-runtime" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends charliecloud-runtime >/dev/null 2>&1 \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends charliecloud-runtime >/dev/null; }
    fi
    command -v ch-run >/dev/null 2>&1 || {
        echo "make-test-image: ch-run not found and could not be installed; run 'apt-get install charliecloud-runtime' as root" >&2
        exit 3
    }
fi

prefix=$("$python" -c 'import os, sys; print(os.path.realpath(sys.prefix))')
base=$("$python" -c 'import os, sys; print(os.path.realpath(sys.base_prefix))')

tmp="$dir.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$tmp"/{usr,dev,proc,sys,tmp,home,mnt,run,root,var/tmp,etc,ch}

binds=(/usr)
for d in bin sbin lib lib32 lib64 libx32; do
    if [ -L "/$d" ]; then
        ln -s "$(readlink "/$d")" "$tmp/$d"            # merged /usr: /bin -> usr/bin ...
    elif [ -d "/$d" ]; then
        mkdir -p "$tmp/$d"
        binds+=("/$d")
    fi
done
for p in "$base" "$prefix"; do
    case "$p" in
        /usr|/usr/*) ;;                                  # inside /usr already
        *) mkdir -p "$tmp$p"; binds+=("$p") ;;
    esac
done
printf '%s\n' "${binds[@]}" | sort -u > "$tmp/ch/host-binds"

for f in ld.so.cache ld.so.conf nsswitch.conf; do
    if [ -e "/etc/$f" ]; then cp -L "/etc/$f" "$tmp/etc/$f"; fi
done
if [ -d /etc/ld.so.conf.d ]; then cp -rL /etc/ld.so.conf.d "$tmp/etc/"; fi
touch "$tmp"/etc/{hosts,resolv.conf,passwd,group,machine-id}   # ch-run bind targets
printf 'PATH=%s/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n' "$prefix" > "$tmp/ch/environment"
cat > "$tmp/ch/README-ftlib" <<EOF
ftlib TEST image made by containers/make-test-image.sh on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ).
python: $prefix (base $base), bound from the host with the paths in /ch/host-binds.
Not for jobs: the job image is built from containers/ftlib.def or containers/Dockerfile.
EOF
find "$tmp" -xdev \( -type b -o -type c -o -type p -o -type s \) -delete   # never device nodes

rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT

bind_args=()
while read -r p; do bind_args+=("--bind=$p"); done < "$dir/ch/host-binds"
inside=$(USER=${USER:-$(id -un)} ch-run "${bind_args[@]}" --set-env "$dir" -- \
    python3 -c 'import os, sys; print(os.path.realpath(sys.prefix))') || inside=""
if [ "$inside" != "$prefix" ]; then
    echo "make-test-image: python3 in $dir runs from '$inside', expected $prefix" >&2
    exit 5
fi
echo "$dir"
