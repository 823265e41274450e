#!/usr/bin/env bash
# Fallback for machines without a container registry: build the Dockerfile's base image locally
# from Debian's packages and import it into podman as localhost/secagg-base:bookworm.
#
#   deploy/base-image.sh [TAG]      # root on Debian; installs debootstrap if missing
#
# Normally `docker build`/`podman build` pull debian:bookworm-slim and this is never needed;
# deploy/build-image.sh calls it only when that pull fails. The image is `debootstrap
# --variant=minbase bookworm`, finished as the official slim image is (apt sources with updates and
# security, Docker's apt settings, no docs, man pages or locales). Cached: an existing TAG is kept.
set -euo pipefail

TAG=${1:-localhost/secagg-base:bookworm}
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
ENGINE=${ENGINE:-podman}

if "$ENGINE" image inspect "$TAG" >/dev/null 2>&1; then
    echo "base-image.sh: $TAG exists (cached)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "base-image.sh: building the base image needs root (debootstrap); run it with sudo" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "base-image.sh: debootstrap is missing and this is not Debian; install debootstrap" >&2
        exit 1
    fi
    echo "base-image.sh: installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

root=$(mktemp -d /var/tmp/secagg-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base-image.sh: debootstrap --variant=minbase $SUITE (a few minutes)"
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# What debuerreotype adds for debian:bookworm-slim, so that the image behaves and weighs the same.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $MIRROR-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
EOF
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{groff,info,linda,locale,man}/* "$root"/usr/share/lintian/overrides/*
rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

tar --numeric-owner -C "$root" -c . \
    | "$ENGINE" import --change 'CMD ["bash"]' --message "debootstrap --variant=minbase $SUITE" - "$TAG" \
        >"$root.log" 2>&1 || { cat "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
echo "base-image.sh: imported $TAG"
