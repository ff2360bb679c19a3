#!/usr/bin/env bash
# build.sh [OUT.sif]: build ftlib's job image from containers/ftlib.def with Apptainer.
#
# Default OUT: ftlib.sif in the repository root. Runs from anywhere (builds from the repository
# root, which %files paths are relative to); needs network access to Docker Hub and PyPI, and
# --fakeroot when not root (the site must have set up subuid/subgid for you). The image is built
# under a temporary name and renamed, so OUT is never a half-written image. Prints OUT and its
# sha256, and writes the digest to OUT.sha256. Set container.image to OUT.
#
# No apptainer here? Build containers/Dockerfile with docker/podman (for enroot/pyxis:
# `enroot import -o ftlib.sqsh dockerd://ftlib`) or ch-image, or build on a machine that has it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
out=$(realpath -m "${1:-$repo/ftlib.sif}")

if ! command -v apptainer >/dev/null 2>&1; then
    echo "build.sh: error: apptainer is not on PATH. Install Apptainer (https://apptainer.org/docs/admin/main/installation.html)" \
         "or load its module, or build containers/Dockerfile with docker/podman/ch-image instead." >&2
    exit 127
fi
for path in pyproject.toml ftlib jobs configs containers/ftlib.def containers/build-llama-cpp.sh; do
    if [ ! -e "$repo/$path" ]; then
        echo "build.sh: error: $repo/$path is missing; the image copies it (see %files in containers/ftlib.def)" >&2
        exit 2
    fi
done

flags=()
if [ "$(id -u)" != 0 ]; then
    flags+=(--fakeroot)
fi
mkdir -p "$(dirname "$out")"
tmp="$out.building.$$"
trap 'rm -f "$tmp"' EXIT

cd "$repo"
echo "build.sh: apptainer build ${flags[*]} $tmp containers/ftlib.def" >&2
apptainer build "${flags[@]}" "$tmp" containers/ftlib.def
mv -f "$tmp" "$out"
trap - EXIT

digest=$(sha256sum "$out" | cut -d' ' -f1)
printf '%s  %s\n' "$digest" "$(basename "$out")" > "$out.sha256"
echo "image: $out"
echo "sha256: $digest"
