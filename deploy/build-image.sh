#!/usr/bin/env bash
# Build the iotgw container image with a clean, small build context (works with the
# legacy builder, which ignores deploy/Dockerfile.dockerignore, and with BuildKit).
#
# Usage: deploy/build-image.sh [--tag TAG] [--features "mqtt gcp_pubsub"]
#                              [--runtime IMAGE] [--prebuilt BINARY [--strip]]
#                              [-- DOCKER_BUILD_ARGS...]
#
#   (default)            multi-stage build from source with deploy/Dockerfile
#                        (needs the rust:<ver>-slim-bookworm image and crates.io)
#   --prebuilt BINARY    package a binary built on this host with deploy/Dockerfile.prebuilt
#                        (e.g. target/release/iotgw); --strip strips a copy first (for debug
#                        builds; release builds are stripped by the workspace profile)
#   --features LIST      provider features of a source build (default: mqtt)
#   --runtime IMAGE      runtime base (default gcr.io/distroless/cc-debian12:nonroot; without
#                        a registry run deploy/images/build-distroless-cc.sh first)
#   --tag TAG            image tag (default iotgw:local)
#   -- ARGS...           passed to `docker build` (e.g. --cpu-shares 256, --network host)
#
# Prints the image size at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="iotgw:local"
FEATURES="mqtt"
RUNTIME=""
PREBUILT=""
STRIP=0
log() { printf '[build-image] %s\n' "$*" >&2; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) TAG="${2:?--tag needs a value}"; shift ;;
        --features) FEATURES="${2:?--features needs a value}"; shift ;;
        --runtime) RUNTIME="${2:?--runtime needs a value}"; shift ;;
        --prebuilt) PREBUILT="${2:?--prebuilt needs a binary}"; shift ;;
        --strip) STRIP=1 ;;
        --) shift; break ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

command -v docker >/dev/null 2>&1 || die "docker CLI not found"
CTX="$(mktemp -d "${TMPDIR:-/var/tmp}/iotgw-image.XXXXXX")"
trap 'rm -rf "$CTX"' EXIT

args=(-t "$TAG")
[ -z "$RUNTIME" ] || args+=(--build-arg "RUNTIME_IMAGE=$RUNTIME")

if [ -n "$PREBUILT" ]; then
    [ -x "$PREBUILT" ] || die "$PREBUILT is not an executable file"
    cp "$PREBUILT" "$CTX/iotgw"
    if [ "$STRIP" = 1 ]; then
        command -v strip >/dev/null 2>&1 || die "--strip needs binutils' strip"
        strip "$CTX/iotgw"
    fi
    cp "$ROOT/deploy/Dockerfile.prebuilt" "$CTX/Dockerfile"
    log "packaging $PREBUILT ($(stat -c %s "$CTX/iotgw") bytes) as $TAG"
else
    # The sources without build output, VCS data or local databases.
    tar -C "$ROOT" --exclude=./.git --exclude=./target --exclude='./target-*' \
        --exclude=./data --exclude='*.db' --exclude='*.db-wal' --exclude='*.db-shm' \
        --exclude=./deploy/images/.build -cf - . | tar -C "$CTX" -xf -
    cp "$ROOT/deploy/Dockerfile" "$CTX/Dockerfile"
    args+=(--build-arg "FEATURES=$FEATURES")
    log "building $TAG from source with features: $FEATURES"
fi

docker build "${args[@]}" "$@" "$CTX"
# The legacy builder keeps the build/prep stage as an untagged image: drop it.
docker image prune --force --filter "label=org.iotgw.image.stage" >/dev/null 2>&1 || true
log "built $TAG: $(docker image inspect -f '{{.Size}}' "$TAG") bytes"
