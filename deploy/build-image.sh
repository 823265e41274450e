#!/usr/bin/env bash
# Build deploy/Dockerfile with docker or podman, whichever reaches an engine (`make image`,
# `make image-site`). Run from anywhere; the build context is the repository root.
#
#   deploy/build-image.sh [--target STAGE] NAME TAG      # tags NAME:TAG and NAME:latest
#
# Environment: ENGINE (docker or podman; default: the first that works), BASE (the base image;
# default the Dockerfile's), PODMAN_CONF (containers.conf for podman; default deploy/containers.conf,
# empty for the machine's own), PIP_CERT (a CA bundle pip must trust: passed as the build secret
# `pip_cert`, never stored in the image).
#
# Where the base image cannot be pulled (no registry reachable), it is built from Debian's packages
# by deploy/base-image.sh and used instead: a fallback for such machines, not the normal path.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
target=()
if [ "${1:-}" = --target ]; then
    target=(--target "$2")
    shift 2
fi
if [ $# -ne 2 ]; then
    echo "usage: $0 [--target STAGE] NAME TAG" >&2
    exit 2
fi
name=$1 tag=$2

engine=${ENGINE:-}
if [ -z "$engine" ]; then
    if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    else
        echo "build-image.sh: no container engine: 'docker info' fails (a docker client without a daemon" >&2
        echo "  cannot build) and podman is not installed. Install one (Debian: apt-get install podman runc)," >&2
        echo "  or run 'make image-test', which installs podman when run as root on Debian." >&2
        exit 1
    fi
fi
args=(build -f "$repo/deploy/Dockerfile" "${target[@]}" -t "$name:$tag" -t "$name:latest")
if [ "$engine" = podman ]; then
    if [ -n "${PODMAN_CONF-$here/containers.conf}" ]; then
        export CONTAINERS_CONF=${PODMAN_CONF-$here/containers.conf}
    fi
    # The OCI image format has no HEALTHCHECK: podman would drop it.
    args+=(--format docker)
fi
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    args+=(--secret "id=pip_cert,src=$PIP_CERT")
fi

base=${BASE:-$(sed -n 's/^ARG BASE=//p' "$repo/deploy/Dockerfile")}
if [ -z "${BASE:-}" ] && ! "$engine" image inspect "$base" >/dev/null 2>&1 \
        && ! "$engine" pull "$base" >/dev/null 2>&1; then
    base=localhost/secagg-base:bookworm
    echo "build-image.sh: cannot pull the base image; using $base, built from Debian's packages (deploy/base-image.sh)"
    ENGINE=$engine "$here/base-image.sh" "$base"
fi
args+=(--build-arg "BASE=$base")

start=$(date +%s)
set -x
"$engine" "${args[@]}" "$repo"
{ set +x; } 2>/dev/null
echo "build-image.sh: built $name:$tag with $engine in $(( $(date +%s) - start )) s"
