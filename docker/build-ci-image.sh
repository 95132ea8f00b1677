#!/usr/bin/env bash
# Builds the CI test image: a bare Debian bookworm (debootstrap --variant=minbase) imported into Docker.
# No registry is reachable on CI machines, so nothing is pulled; task containers run the project's own
# virtualenv bind-mounted read-only (executor.host_venv / BYOL_RUNNER_HOST_VENV=1).
# Usage: docker/build-ci-image.sh [TAG]   (default byol-runner-ci:bookworm; does nothing if it exists)
set -euo pipefail
TAG="${1:-byol-runner-ci:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "image $TAG exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
ROOTFS="$(mktemp -d /tmp/byol-runner-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm into $ROOTFS ..."
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log" >&2; exit 1; }
rm -f "$ROOTFS.log"
tar -C "$ROOTFS" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'LABEL io.github.byol-runner.image=ci' - "$TAG"
echo "built $TAG"
