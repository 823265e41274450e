#!/usr/bin/env bash
# Build deploy/Dockerfile into a root filesystem with debootstrap + chroot (no container engine),
# then serve a real round from it as the non-root user on a read-only root (deploy/rootfs.py).
#
#   sudo deploy/verify_rootfs.sh [--build-only] [--workdir DIR]
#
# Needs root, debootstrap (installed with apt-get if missing), util-linux's unshare, network to
# Debian's mirrors and PyPI, and this repository's .venv (`make install`) for the client side.
# The debootstrap base is cached in deploy/.rootfs (gitignored): reruns take a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "verify_rootfs.sh: needs root (debootstrap, chroot and mounts); run it with sudo" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    echo "verify_rootfs.sh: installing debootstrap" >&2
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
fi
for tool in unshare chroot; do
    command -v "$tool" >/dev/null || { echo "verify_rootfs.sh: $tool is missing (util-linux, coreutils)" >&2; exit 1; }
done
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ] || ! "$PY" -c "import secagg, numpy, yaml" 2>/dev/null; then
    echo "verify_rootfs.sh: $PY cannot import secagg, numpy and yaml; run 'make install' first" >&2
    exit 1
fi
exec "$PY" deploy/rootfs.py "$@"
