#!/usr/bin/env bash
# Build, locally and without any container registry, a stand-in for the public
# distroless runtime image that deploy/Dockerfile runs iotgw on, tagged with its
# PUBLIC name:
#
#   gcr.io/distroless/cc-debian12:nonroot   (and :latest)
#
# Like the public image it holds no shell and no package manager, only what a
# dynamically linked Rust/C++ binary needs at run time, taken from Debian bookworm
# packages (unpacked with dpkg-deb, never installed):
#   libc6 libgcc-s1 libgomp1 libstdc++6 libssl3 netbase tzdata
# plus the CA bundle of Debian's ca-certificates, /etc/passwd and /etc/group with
# root (0), nonroot (65532) and nobody (65534), /home/nonroot, /tmp (1777), and one
# /var/lib/dpkg/status.d/<package> file per package so image scanners see the
# versions. USER 65532:65532, WORKDIR /home/nonroot,
# SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt, as in the public image.
#
# On a machine with registry access none of this is needed: `docker build` pulls
# the public image. Safe to run again: an existing image is kept unless --force.
#
# Usage: deploy/images/build-distroless-cc.sh [--force] [--verify] [--help]
#   --force    rebuild even if the image already exists
#   --verify   run a dynamically linked program of the image's own (the loader's
#              --version) as uid 65532 and check the user, CA bundle and libraries
#
# Environment:
#   IOTGW_BUILD_NETWORK   network for `docker build` (default: auto-detect;
#                         "default" or "host"): apt needs deb.debian.org
#   IOTGW_DISTROLESS_PACKAGES  override the package list above
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE_IMAGE="debian:bookworm-slim"
IMAGE="gcr.io/distroless/cc-debian12:nonroot"
IMAGE_LATEST="gcr.io/distroless/cc-debian12:latest"
PACKAGES="${IOTGW_DISTROLESS_PACKAGES:-libc6 libgcc-s1 libgomp1 libstdc++6 libssl3 netbase tzdata}"
LOCAL_LABEL="org.iotgw.images.local-build=true"
BUILDER_LABEL="org.iotgw.images.stage=builder"
export DOCKER_BUILDKIT=0

FORCE=0
VERIFY=0
log() { printf '[distroless] %s\n' "$*" >&2; }
die() { printf '[distroless] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --verify) VERIFY=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

command -v docker >/dev/null 2>&1 || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker engine (is it running? are you root/in the docker group?)"

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

if ! image_exists "$BASE_IMAGE"; then
    log "$BASE_IMAGE missing: building it with build-local-images.sh"
    IOTGW_IMAGES=base bash "$SCRIPT_DIR/build-local-images.sh"
fi

verify() {
    log "verifying $IMAGE"
    local out
    out="$(docker run --rm --entrypoint /lib64/ld-linux-x86-64.so.2 "$IMAGE" --version 2>&1 | head -n 1)" \
        || die "the image cannot run its own dynamic loader: $out"
    log "  loader: $out"
    [ "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" = "65532:65532" ] || die "USER is not 65532:65532"
    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/var/tmp}/iotgw-distroless-verify.XXXXXX")"
    local c="iotgw-distroless-verify-$$"
    docker create --name "$c" "$IMAGE" /nothing >/dev/null
    docker export "$c" | tar -C "$tmp" -xf - etc/passwd etc/ssl/certs/ca-certificates.crt 2>/dev/null || true
    docker rm -f "$c" >/dev/null
    grep -q '^nonroot:x:65532:65532:' "$tmp/etc/passwd" || { rm -rf "$tmp"; die "no nonroot user in /etc/passwd"; }
    [ -s "$tmp/etc/ssl/certs/ca-certificates.crt" ] || { rm -rf "$tmp"; die "no CA bundle"; }
    rm -rf "$tmp"
    log "verified $IMAGE: OK ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
}

if [ "$FORCE" = 0 ] && image_exists "$IMAGE"; then
    log "$IMAGE present, skipping (use --force to rebuild)"
    image_exists "$IMAGE_LATEST" || docker tag "$IMAGE" "$IMAGE_LATEST"
    [ "$VERIFY" = 0 ] || verify
    exit 0
fi

# Same network detection as build-local-images.sh: apt inside the build needs deb.debian.org.
if [ -n "${IOTGW_BUILD_NETWORK:-}" ]; then
    NET="$IOTGW_BUILD_NETWORK"
else
    probe='timeout 10 bash -c "exec 3<>/dev/tcp/deb.debian.org/80"'
    if docker run --rm "$BASE_IMAGE" bash -c "$probe" >/dev/null 2>&1; then
        NET=default
    elif docker run --rm --network host "$BASE_IMAGE" bash -c "$probe" >/dev/null 2>&1; then
        NET=host
    else
        die "containers cannot reach deb.debian.org:80, neither on the default bridge nor with --network host"
    fi
fi
log "building $IMAGE from Debian packages: $PACKAGES (network $NET)"

WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/iotgw-distroless.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

cat >"$WORK/Dockerfile" <<'EOF'
# Stand-in for gcr.io/distroless/cc-debian12:nonroot, built by build-distroless-cc.sh.
FROM debian:bookworm-slim AS rootfs
LABEL org.iotgw.images.stage=builder
ARG PACKAGES
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends ca-certificates >/dev/null; \
    mkdir -p /debs /rootfs/var/lib/dpkg/status.d; \
    cd /debs; \
    apt-get download $PACKAGES; \
    for deb in /debs/*.deb; do \
        dpkg-deb -x "$deb" /rootfs; \
        pkg="$(dpkg-deb -f "$deb" Package)"; \
        { dpkg-deb -f "$deb"; echo "Status: install ok installed"; } >"/rootfs/var/lib/dpkg/status.d/$pkg"; \
    done; \
    rm -rf /rootfs/usr/share/doc /rootfs/usr/share/man /rootfs/usr/share/info \
           /rootfs/usr/share/lintian /rootfs/usr/share/locale /rootfs/usr/share/gcc \
           /rootfs/usr/share/gdb; \
    mkdir -p /rootfs/etc/ssl/certs /rootfs/home/nonroot /rootfs/root /rootfs/tmp; \
    cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt; \
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
        'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >/rootfs/etc/passwd; \
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' \
        'nonroot:x:65532:' >/rootfs/etc/group; \
    printf '%s\n' 'passwd: files' 'group: files' 'shadow: files' 'hosts: files dns' \
        'networks: files' 'protocols: files' 'services: files' >/rootfs/etc/nsswitch.conf; \
    cp /etc/os-release /rootfs/etc/os-release; \
    ln -sf /usr/share/zoneinfo/Etc/UTC /rootfs/etc/localtime; \
    echo 'Etc/UTC' >/rootfs/etc/timezone; \
    chown 65532:65532 /rootfs/home/nonroot; \
    chmod 0700 /rootfs/root /rootfs/home/nonroot; \
    chmod 1777 /rootfs/tmp; \
    test -e /rootfs/lib64/ld-linux-x86-64.so.2 -o -e /rootfs/lib/ld-linux-aarch64.so.1

FROM scratch
COPY --from=rootfs /rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /home/nonroot
EOF

docker build --network "$NET" --label "$LOCAL_LABEL" --build-arg "PACKAGES=$PACKAGES" \
    -t "$IMAGE" -t "$IMAGE_LATEST" "$WORK" >"$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log" >&2; die "docker build of $IMAGE failed (log above)"; }
docker image prune -f --filter "label=$BUILDER_LABEL" >/dev/null 2>&1 || true
log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
[ "$VERIFY" = 0 ] || verify
