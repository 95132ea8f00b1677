#!/bin/sh
# The image's entrypoint: `docker run IMAGE run experiments/ci.yaml` is `byol-runner run ...`.
# A task container runs as the invoking user's uid:gid, which has no home in the image: give it a
# writable one so PyTorch and matplotlib caches have somewhere to go.
set -e
if [ -z "${HOME:-}" ] || [ "$HOME" = "/" ] || ! [ -w "$HOME" ]; then
    export HOME=/tmp
fi
exec byol-runner "$@"
