#!/usr/bin/env bash
# Makes this machine able to build and run the image without Docker (CI, and the developers' Debian 12 machines;
# as root): installs buildah, podman, runc and debootstrap from Debian, then makes the stand-in for the base image,
# which no registry can give here: a minimal Debian bookworm (the distribution of python:3.11-slim-bookworm) with
# its Python 3.11, made by debootstrap and imported into podman's store. Idempotent: a second run takes a second.
# Prints the base image's name on its last line.
#   bash docker/ci-setup.sh          then: pytest -m container
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF=$PWD/docker/ci/containers.conf

need=()
for pkg in buildah podman runc debootstrap; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "ci-setup: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
include=python3,python3-venv,ca-certificates
# The tag names what went into it, so a change here makes a new one and an unchanged one is reused.
tag=$(printf '%s\n' "$suite" minbase "$include" | sha256sum | cut -c1-12)
image=localhost/qlora-job-ci-base:$suite-$tag
if ! podman image exists "$image"; then
    echo "ci-setup: making $image with debootstrap" >&2
    root=$(mktemp -d /var/tmp/qlora-job-ci-base.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include="$include" "$suite" "$root" "$mirror" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
fi
echo "$image"
