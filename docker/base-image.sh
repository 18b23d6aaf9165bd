#!/usr/bin/env bash
# Builds a Debian bookworm base image with Python 3.11 from Debian's own packages, for hosts
# that reach a Debian mirror but no container registry (Docker Hub). The result stands in for
# python:3.11-slim:  docker build --build-arg BASE_IMAGE=mnist-gan-base:bookworm ...
# Usage (root): docker/base-image.sh [TAG]   (MIRROR=... to pick a Debian mirror)
set -euo pipefail

TAG="${1:-mnist-gan-base:bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$TAG" >/dev/null 2>&1 && [[ -z "${FORCE:-}" ]]; then
    echo "base image $TAG exists (FORCE=1 to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null || apt-get install -y -q debootstrap

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
# minbase: essential packages + apt only; python3-venv brings ensurepip, so the image can
# create the virtual environment the Dockerfile installs into.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$MIRROR"
# What a slim image drops anyway: package lists, caches, docs, man pages.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/log/*.log "$rootfs"/tmp/*
tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$TAG"
docker image ls "$TAG"
