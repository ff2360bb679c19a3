#!/usr/bin/env bash
# install-apptainer.sh [PREFIX [BINDIR]]: make `apptainer` usable on a Debian 12 development or CI machine.
#
# FOR DEVELOPMENT AND CI ONLY. Clusters provide their own Apptainer (a site install or module);
# ftlib only needs `apptainer` on PATH on the login and compute nodes.
#
# Debian 12 packages no apptainer. This takes Debian unstable's apptainer .deb and that suite's
# libc6 .deb (apptainer needs glibc >= 2.38; Debian 12 has 2.36), fetched with `apt-get download`
# through a private sources file and apt state directory, so the system's own sources and package
# database stay Debian 12 and nothing is installed system-wide. Both are unpacked with
# `dpkg-deb -x` into PREFIX, and the apptainer binary and its starter are patched (patchelf) to
# use that libc. Then PREFIX/bin/apptainer is a link to the binary.
#
#   PREFIX    default /opt/ftlib-apptainer
#   BINDIR    also link BINDIR/apptainer to it (e.g. /usr/local/bin, so that it is on PATH for
#             everyone, Slurm jobs included); default: no link
#
# Idempotent: a second run with the same PREFIX only checks that the binary runs. When an
# `apptainer` is already on PATH it does nothing but print that one's path. Prints the path of the
# apptainer binary it made usable as its last line (put its directory on PATH).
# Needs root (apt-get), and Debian 12's patchelf and squashfs-tools (installed when missing;
# apptainer build runs mksquashfs). Network: only the Debian package archive. About 20 s.
#
# Environment:
#   FTLIB_APPTAINER_SUITE     Debian suite to take apptainer from (default unstable)
#   FTLIB_APPTAINER_MIRROR    archive URL (default http://deb.debian.org/debian)
#   FTLIB_APPTAINER_FORCE=1   install into PREFIX even if an apptainer is on PATH
set -euo pipefail

prefix=$(realpath -m "${1:-/opt/ftlib-apptainer}")
bindir=${2:+$(realpath -m "$2")}
suite=${FTLIB_APPTAINER_SUITE:-unstable}
mirror=${FTLIB_APPTAINER_MIRROR:-http://deb.debian.org/debian}
say() { echo "install-apptainer: $*" >&2; }

if [ "${FTLIB_APPTAINER_FORCE:-0}" != 1 ] && existing=$(command -v apptainer 2>/dev/null); then
    say "apptainer is already on PATH ($("$existing" --version 2>/dev/null || echo 'version unknown')); nothing to do"
    echo "$existing"
    exit 0
fi

works() { "$prefix/bin/apptainer" --version >/dev/null 2>&1; }
link() {
    [ -n "$bindir" ] || return 0
    mkdir -p "$bindir"
    ln -sfn "$prefix/bin/apptainer" "$bindir/apptainer"
    say "linked $bindir/apptainer -> $prefix/bin/apptainer"
}
if [ -f "$prefix/.ftlib-installed" ] && works; then
    say "already installed in $prefix ($("$prefix/bin/apptainer" --version))"
    link
    echo "$prefix/bin/apptainer"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    say "error: needs root (apt-get download and the Debian packages patchelf, squashfs-tools)."
    say "On a cluster, use the site's apptainer (module load apptainer) instead."
    exit 3
fi
start=$(date +%s)
need=()
command -v patchelf >/dev/null || need+=(patchelf)
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} (Debian 12)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

work=$(mktemp -d /var/tmp/ftlib-apptainer-apt.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{sources,lists/partial,cache/archives/partial,debs}
cat > "$work/sources/$suite.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# A private sources file, lists and cache: the system's apt configuration is not touched.
apt_opts=(-o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$work/sources"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
          -o "APT::Sandbox::User=root")
say "fetching the $suite package index"
apt-get "${apt_opts[@]}" update -qq >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; exit 1; }
app_version=$(apt-cache "${apt_opts[@]}" policy apptainer | awk '/Candidate:/ { print $2 }')
libc_version=$(apt-cache "${apt_opts[@]}" madison libc6 | awk -v s="$suite" '$0 ~ s { print $3; exit }')
[ -n "$app_version" ] && [ "$app_version" != "(none)" ] || { say "error: no apptainer package in $suite"; exit 1; }
[ -n "$libc_version" ] || { say "error: no libc6 package in $suite"; exit 1; }
say "downloading apptainer $app_version and libc6 $libc_version from $suite"
(cd "$work/debs" && apt-get "${apt_opts[@]}" download -qq "apptainer=$app_version" "libc6=$libc_version" \
    >"$work/download.log" 2>&1) || { cat "$work/download.log" >&2; exit 1; }

# Unpack beside PREFIX and rename at the end: PREFIX is either the old install or the new one.
staging="$prefix.staging.$$"
rm -rf "$staging"
mkdir -p "$staging"
trap 'rm -rf "$work" "$staging"' EXIT
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$staging"
done

# The binaries run with the unpacked libc (its loader and libraries), and find the system's
# other libraries (libseccomp, libsqlite3 ...) in /lib/x86_64-linux-gnu.
arch_lib=usr/lib/x86_64-linux-gnu
loader=$staging/$arch_lib/ld-linux-x86-64.so.2
[ -e "$loader" ] || { say "error: $loader missing after unpacking libc6"; exit 1; }
for bin in usr/bin/apptainer "$arch_lib/apptainer/bin/starter"; do
    [ -f "$staging/$bin" ] || { say "error: $bin missing in the apptainer package"; exit 1; }
    # --force-rpath: DT_RPATH, which wins over an LD_LIBRARY_PATH that apptainer sets for helpers
    patchelf --set-interpreter "$prefix/$arch_lib/ld-linux-x86-64.so.2" \
             --force-rpath --set-rpath "$prefix/$arch_lib:/lib/x86_64-linux-gnu" "$staging/$bin"
done
# apptainer derives its configuration directory (sysconfdir) and state directory from where the
# binary lies: <prefix>/usr/etc/apptainer and <prefix>/usr/lib/var/lib/apptainer.
ln -sfn ../etc "$staging/usr/etc"
ln -sfn ../../etc "$staging/usr/lib/etc"
mkdir -p "$staging/usr/lib/var/lib/apptainer/mnt/session" "$staging/bin"
# Root in this kind of sandbox lacks CAP_SYS_RESOURCE, and apptainer run by root asks for the full
# capability set by default ("Requesting capability set ... while permitted capability set is ...").
# Jobs need no capability inside (on a cluster they run as users, who get none), so root gets none
# either. Everything else is Debian's apptainer.conf as packaged. (The --userns route is no use
# for `exec` here: it unpacks the SIF into a sandbox on every start and, with no subuid map, fails
# on files owned by other groups.)
conf=$staging/etc/apptainer/apptainer.conf
grep -q '^root default capabilities = ' "$conf" || { say "error: $conf has no 'root default capabilities'"; exit 1; }
sed -i 's/^root default capabilities = .*/root default capabilities = no/' "$conf"
ln -sfn ../usr/bin/apptainer "$staging/bin/apptainer"
ln -sfn apptainer "$staging/bin/singularity"
printf 'apptainer %s and libc6 %s from Debian %s, installed by %s on %s\n' "$app_version" "$libc_version" \
    "$suite" "containers/install-apptainer.sh" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$staging/.ftlib-installed"

rm -rf "$prefix.old.$$"
[ -e "$prefix" ] && mv "$prefix" "$prefix.old.$$"
mv "$staging" "$prefix"
rm -rf "$prefix.old.$$"
works || { say "error: $prefix/bin/apptainer does not run:"; "$prefix/bin/apptainer" --version >&2 || true; exit 1; }
say "installed $("$prefix/bin/apptainer" --version) in $prefix in $(( $(date +%s) - start )) s"
link
[ -n "$bindir" ] || say "add $prefix/bin to PATH"
echo "$prefix/bin/apptainer"
