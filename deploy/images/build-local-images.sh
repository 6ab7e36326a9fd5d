#!/usr/bin/env bash
# Build, locally and without any container registry, the Docker images that the
# iotgw integration tests use, tagged with their PUBLIC names:
#
#   base       debian:bookworm-slim          (debootstrap --variant=minbase + docker import)
#   mosquitto  eclipse-mosquitto:2           (Debian's mosquitto + dynamic security plugin)
#   moto       motoserver/moto:<ver>, :latest (python3 venv + pip install moto[server]==<ver>)
#   postgres   postgres:15                   (Debian's postgresql-15 + official-style entrypoint)
#   pubsub     gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators
#                                            (openjdk-17 + host's Pub/Sub emulator + gcloud shim)
#
# On a machine with registry access none of this is needed: the tests simply pull
# the public images. See deploy/images/README.md.
#
# Usage: deploy/images/build-local-images.sh [--force] [--verify] [--help]
#   --force    rebuild the selected images even if they already exist
#              (without the docker build cache)
#   --verify   after building, run a smoke test of every selected image
#
# Environment:
#   IOTGW_IMAGES          space-separated subset of: base mosquitto moto postgres pubsub
#                         (default: all). The base image is always built first when
#                         missing, because every other image is FROM it.
#   IOTGW_MOTO_VERSION    moto version to pip-install and tag (default 5.1.4)
#   IOTGW_DEBIAN_MIRROR   mirror for debootstrap (default http://deb.debian.org/debian)
#   IOTGW_BUILD_NETWORK   network for `docker build`/`docker run` during builds
#                         (default: auto-detect; "default" or "host")
#   IOTGW_PUBSUB_EMULATOR_DIR  emulator files to copy
#                         (default /usr/lib/google-cloud-sdk/platform/pubsub-emulator)
#   IOTGW_HOST_CA_BUNDLE  CA bundle handed to pip in the moto *builder* stage only
#                         (default /etc/ssl/certs/ca-certificates.crt; needed behind a
#                         TLS-intercepting egress proxy). It does not end up in the image.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

BASE_IMAGE="debian:bookworm-slim"
MOSQUITTO_IMAGE="eclipse-mosquitto:2"
MOTO_VERSION="${IOTGW_MOTO_VERSION:-5.1.4}"
MOTO_IMAGE="motoserver/moto:${MOTO_VERSION}"
MOTO_IMAGE_LATEST="motoserver/moto:latest"
POSTGRES_IMAGE="postgres:15"
PUBSUB_IMAGE="gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators"

DEBIAN_SUITE="bookworm"
DEBIAN_MIRROR="${IOTGW_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PUBSUB_EMULATOR_DIR="${IOTGW_PUBSUB_EMULATOR_DIR:-/usr/lib/google-cloud-sdk/platform/pubsub-emulator}"
HOST_CA_BUNDLE="${IOTGW_HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
LOCAL_LABEL="org.iotgw.images.local-build=true"
BUILDER_LABEL="org.iotgw.images.stage=builder"

# No buildx on the CI machine: use the classic builder explicitly (it never pulls
# a FROM image that exists locally).
export DOCKER_BUILDKIT=0

FORCE=0
VERIFY=0
ALL_IMAGES="base mosquitto moto postgres pubsub"

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --verify) VERIFY=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

# --- selection ---------------------------------------------------------------
SELECTED=""
for want in ${IOTGW_IMAGES:-$ALL_IMAGES}; do
    case "$want" in
        base|debian|debian-slim) want=base ;;
        mosquitto|eclipse-mosquitto) want=mosquitto ;;
        moto|motoserver) want=moto ;;
        postgres|postgresql) want=postgres ;;
        pubsub|pubsub-emulator|gcloud|emulators|google-cloud-cli) want=pubsub ;;
        *) die "IOTGW_IMAGES: unknown image '$want' (known: $ALL_IMAGES)" ;;
    esac
    case " $SELECTED " in *" $want "*) ;; *) SELECTED="$SELECTED $want" ;; esac
done
SELECTED="${SELECTED# }"
[ -n "$SELECTED" ] || die "IOTGW_IMAGES selects nothing"
selected() { case " $SELECTED " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# --- prerequisites -----------------------------------------------------------
command -v docker >/dev/null 2>&1 || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker engine (is it running? are you root/in the docker group?)"

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "not root and no sudo: debootstrap/apt-get need root"
    SUDO="sudo"
fi

WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/iotgw-images.XXXXXX")"
TEST_CONTAINERS=()
cleanup() {
    local c
    for c in "${TEST_CONTAINERS[@]+"${TEST_CONTAINERS[@]}"}"; do
        docker rm -f "$c" >/dev/null 2>&1 || true
    done
    $SUDO rm -rf "$WORK"
}
trap cleanup EXIT

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

SUMMARY=()
record() { SUMMARY+=("$(printf '%-60s %s' "$1" "$2")"); }

APT_UPDATED=0
host_apt_install() {
    # host_apt_install PACKAGE... : install on the host when missing
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    command -v apt-get >/dev/null 2>&1 || die "need ${missing[*]} but this host has no apt-get"
    if [ "$APT_UPDATED" = 0 ]; then
        log "host: apt-get update"
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    log "host: apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- build network -----------------------------------------------------------
BUILD_NET=""
detect_build_network() {
    # detect_build_network [PROBE_IMAGE]
    local probe_image="${1:-$BASE_IMAGE}"
    [ -z "$BUILD_NET" ] || return 0
    if [ -n "${IOTGW_BUILD_NETWORK:-}" ]; then
        BUILD_NET="$IOTGW_BUILD_NETWORK"
    else
        local probe='timeout 10 bash -c "exec 3<>/dev/tcp/deb.debian.org/80"'
        if docker run --rm "$probe_image" bash -c "$probe" >/dev/null 2>&1; then
            BUILD_NET="default"
        elif docker run --rm --network host "$probe_image" bash -c "$probe" >/dev/null 2>&1; then
            BUILD_NET="host"
        else
            die "containers cannot reach deb.debian.org:80, neither on the default bridge nor with --network host"
        fi
    fi
    log "container builds use network '$BUILD_NET'"
}

# --- base image --------------------------------------------------------------
build_base() {
    host_apt_install debootstrap debian-archive-keyring
    local rootfs="$WORK/rootfs"
    log "debootstrap --variant=minbase $DEBIAN_SUITE from $DEBIAN_MIRROR"
    $SUDO debootstrap --variant=minbase --components=main \
        "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

    # Apt sources like the host / the official image: bookworm, -updates, -security.
    $SUDO rm -f "$rootfs/etc/apt/sources.list"
    $SUDO tee "$rootfs/etc/apt/sources.list.d/debian.sources" >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # "slim": keep docs/man/locales out of every later package install.
    $SUDO tee "$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" >/dev/null <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    $SUDO tee "$rootfs/etc/apt/apt.conf.d/docker-clean" >/dev/null <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    $SUDO tee "$rootfs/etc/apt/apt.conf.d/docker-no-languages" >/dev/null <<'EOF'
Acquire::Languages "none";
EOF
    $SUDO tee "$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes" >/dev/null <<'EOF'
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
EOF
    # Never start daemons from package maintainer scripts inside an image build.
    $SUDO tee "$rootfs/usr/sbin/policy-rc.d" >/dev/null <<'EOF'
#!/bin/sh
exit 101
EOF
    $SUDO chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
    # Trim what debootstrap left behind.
    $SUDO find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    $SUDO find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    $SUDO rm -rf "$rootfs/usr/share/man/"* "$rootfs/usr/share/info/"* "$rootfs/usr/share/groff/"* \
        "$rootfs/usr/share/lintian/"* "$rootfs/usr/share/locale/"*/ \
        "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/cache/apt/"*.bin \
        "$rootfs/var/lib/apt/lists/"* "$rootfs/var/log/"*.log "$rootfs/var/log/apt/"* \
        "$rootfs/var/cache/debconf/"*-old "$rootfs/var/lib/dpkg/"*-old
    $SUDO truncate -s 0 "$rootfs/etc/machine-id" 2>/dev/null || true
    $SUDO rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"
    $SUDO touch "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"

    local raw="iotgw-images/debian-rootfs:raw"
    log "docker import rootfs -> $raw"
    $SUDO tar --numeric-owner --xattrs -C "$rootfs" -c . | docker import - "$raw" >/dev/null
    $SUDO rm -rf "$rootfs"

    # Apply bookworm-updates/-security, then flatten into a single layer.
    detect_build_network "$raw"
    local c="iotgw-images-base-$$"
    TEST_CONTAINERS+=("$c")
    log "apt-get upgrade inside the new root (security + updates)"
    docker run --name "$c" --network "$BUILD_NET" "$raw" bash -c '
        set -e
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get upgrade -y -qq >/dev/null
        apt-get clean
        rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/*.log /var/cache/debconf/*-old /var/lib/dpkg/*-old
    ' || die "apt-get upgrade in the base image failed"
    docker export "$c" | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "LABEL $LOCAL_LABEL" \
        --change 'CMD ["bash"]' \
        - "$BASE_IMAGE" >/dev/null
    docker rm -f "$c" >/dev/null
    docker rmi "$raw" >/dev/null
}

# --- generic docker build helper ---------------------------------------------
# docker_build CONTEXT_DIR TAG [TAG...] [-- EXTRA_DOCKER_BUILD_ARGS...]
docker_build() {
    local ctx="$1"; shift
    local tags=() extra=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do tags+=(-t "$1"); shift; done
    [ $# -gt 0 ] && shift
    extra=("$@")
    detect_build_network
    # --force means a real rebuild (fresh packages), not a cache hit.
    if [ "$FORCE" = 1 ]; then
        extra+=(--no-cache)
    fi
    docker build --network "$BUILD_NET" --label "$LOCAL_LABEL" \
        "${tags[@]}" "${extra[@]+"${extra[@]}"}" "$ctx" >"$WORK/build.log" 2>&1 \
        || { tail -n 40 "$WORK/build.log" >&2; die "docker build of ${tags[1]} failed (log above)"; }
    # Drop the untagged intermediate images of multi-stage builds.
    docker image prune -f --filter "label=$BUILDER_LABEL" >/dev/null 2>&1 || true
}

# Copy deploy/images/<name> into a fresh, throw-away build context.
make_context() {
    local name="$1" ctx="$WORK/ctx-$1"
    rm -rf "$ctx"
    cp -a "$SCRIPT_DIR/$name" "$ctx"
    printf '%s\n' "$ctx"
}

build_mosquitto() {
    docker_build "$(make_context mosquitto)" "$MOSQUITTO_IMAGE"
}

build_moto() {
    local ctx
    ctx="$(make_context moto)"
    if [ -s "$HOST_CA_BUNDLE" ]; then
        cp "$HOST_CA_BUNDLE" "$ctx/host-ca-bundle.crt"
    else
        : >"$ctx/host-ca-bundle.crt"
    fi
    docker_build "$ctx" "$MOTO_IMAGE" "$MOTO_IMAGE_LATEST" -- \
        --build-arg "MOTO_VERSION=$MOTO_VERSION" \
        --build-arg "PIP_INDEX_URL=${PIP_INDEX_URL:-}"
    local got
    got="$(docker run --rm --entrypoint /opt/moto/bin/python "$MOTO_IMAGE" \
        -c 'import importlib.metadata as m; print(m.version("moto"))')"
    [ "$got" = "$MOTO_VERSION" ] || die "moto image contains moto $got, expected $MOTO_VERSION"
    log "moto version in image: $got"
}

build_postgres() {
    docker_build "$(make_context postgres)" "$POSTGRES_IMAGE"
}

build_pubsub() {
    if [ ! -d "$PUBSUB_EMULATOR_DIR/lib" ]; then
        if apt-cache policy google-cloud-cli-pubsub-emulator 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            host_apt_install google-cloud-cli-pubsub-emulator
        fi
        [ -d "$PUBSUB_EMULATOR_DIR/lib" ] || die "Pub/Sub emulator not found at $PUBSUB_EMULATOR_DIR (install the Debian package google-cloud-cli-pubsub-emulator or set IOTGW_PUBSUB_EMULATOR_DIR)"
    fi
    local ctx
    ctx="$(make_context pubsub-emulator)"
    cp -a "$PUBSUB_EMULATOR_DIR" "$ctx/pubsub-emulator"
    rm -f "$ctx/pubsub-emulator/bin/"*.bat
    docker_build "$ctx" "$PUBSUB_IMAGE"
}

# build_one KEY IMAGE
build_one() {
    local key="$1" image="$2" t0 dt old_id
    if [ "$FORCE" = 0 ] && image_exists "$image"; then
        log "$image present, skipping"
        record "$image" "present (skipped)"
        return 0
    fi
    log "building $image ..."
    old_id="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
    t0=$(date +%s)
    "build_$key"
    dt=$(( $(date +%s) - t0 ))
    # --force: drop the replaced image unless something still uses it
    # (e.g. an old base that other images are built FROM).
    if [ -n "$old_id" ] && [ "$old_id" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
        docker rmi "$old_id" >/dev/null 2>&1 || true
    fi
    log "built $image in $(fmt_secs "$dt") (${dt}s)"
    record "$image" "built in ${dt}s"
}

# --- smoke tests (--verify) --------------------------------------------------
# NB: these functions run in an `if`, where `set -e` is inert: every step
# checks its own status.
fail() { log "  check failed: $*"; return 1; }

wait_log() {
    # wait_log CONTAINER PATTERN TIMEOUT_SECS [stdout|stderr|both]
    local c="$1" pat="$2" n="$3" stream="${4:-both}" i out
    for ((i = 0; i < n * 2; i++)); do
        case "$stream" in
            stdout) out="$(docker logs "$c" 2>/dev/null)" ;;
            stderr) out="$(docker logs "$c" 2>&1 >/dev/null)" ;;
            *) out="$(docker logs "$c" 2>&1)" ;;
        esac
        if grep -qF -- "$pat" <<<"$out"; then return 0; fi
        if [ "$(docker inspect -f '{{.State.Running}}' "$c" 2>/dev/null)" != true ]; then
            docker logs "$c" 2>&1 | tail -n 30 >&2
            fail "container $c exited before logging '$pat'"; return 1
        fi
        sleep 0.5
    done
    docker logs "$c" 2>&1 | tail -n 30 >&2
    fail "no '$pat' on $stream of $c within ${n}s"
}

new_test_container() {
    # new_test_container NAME : remove a leftover one, register for cleanup
    docker rm -f "$1" >/dev/null 2>&1 || true
    TEST_CONTAINERS+=("$1")
}

verify_base() {
    docker run --rm "$BASE_IMAGE" bash -c '. /etc/os-release && echo "$PRETTY_NAME"' | grep -q bookworm \
        || fail "not bookworm"
}

verify_mosquitto() {
    local c="iotgw-verify-mosquitto-$$" cfg="$WORK/mosq-dynsec.conf"
    printf '%s\n' \
        'listener 1883' \
        'allow_anonymous false' \
        'per_listener_settings false' \
        'plugin /usr/lib/mosquitto_dynamic_security.so' \
        'plugin_opt_config_file /mosquitto/config/dynamic-security.json' >"$cfg"
    new_test_container "$c"
    # dynsec init runs as root and writes the file 0600: hand it to the broker user.
    docker create --name "$c" "$MOSQUITTO_IMAGE" sh -c \
        'mosquitto_ctrl dynsec init /mosquitto/config/dynamic-security.json admin s3cret \
         && chown mosquitto:mosquitto /mosquitto/config/dynamic-security.json \
         && exec /usr/sbin/mosquitto -c /mosquitto/config/mosquitto.conf' >/dev/null || return 1
    docker cp "$cfg" "$c:/mosquitto/config/mosquitto.conf" || return 1
    docker start "$c" >/dev/null || return 1
    wait_log "$c" " running" 20 || return 1
    docker exec "$c" mosquitto_pub -h 127.0.0.1 -u admin -P s3cret -t iotgw/verify -m hello \
        || fail "publish as dynsec admin refused" || return 1
    if docker exec "$c" mosquitto_pub -h 127.0.0.1 -u admin -P wrong -t iotgw/verify -m x 2>/dev/null; then
        fail "publish with a wrong password accepted"; return 1
    fi
    docker exec "$c" mosquitto_ctrl -h 127.0.0.1 -u admin -P s3cret dynsec listClients | grep -q admin \
        || fail "mosquitto_ctrl dynsec listClients" || return 1
    docker rm -f "$c" >/dev/null
}

verify_moto() {
    local c="iotgw-verify-moto-$$"
    new_test_container "$c"
    docker run -d --name "$c" "$MOTO_IMAGE" >/dev/null || return 1
    wait_log "$c" "Running on" 60 || return 1
    docker exec "$c" python3 -c '
import json, urllib.request
urllib.request.urlopen("http://127.0.0.1:5000/moto-api/").read()
# IoT ListThings; moto picks the service from the SigV4 credential scope
req = urllib.request.Request("http://127.0.0.1:5000/things", headers={"Authorization":
    "AWS4-HMAC-SHA256 Credential=test/20250101/us-east-1/iot/aws4_request, SignedHeaders=host, Signature=00"})
print(json.load(urllib.request.urlopen(req)))' | grep -q "'things'" \
        || fail "moto-api / iot ListThings" || return 1
    docker rm -f "$c" >/dev/null
}

verify_postgres() {
    local c="iotgw-verify-postgres-$$" ip
    new_test_container "$c"
    docker run -d --name "$c" -e POSTGRES_PASSWORD=s3cret -e POSTGRES_USER=iotgw -e POSTGRES_DB=iotgw \
        "$POSTGRES_IMAGE" -c fsync=off >/dev/null || return 1
    # Same two-step wait as testcontainers' Postgres module: the final server
    # logs on stderr, the temporary init-time server (via pg_ctl) on stdout.
    wait_log "$c" "database system is ready to accept connections" 60 stderr || return 1
    wait_log "$c" "database system is ready to accept connections" 5 stdout || return 1
    ip="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$c")"
    docker run --rm --network "container:$c" "$POSTGRES_IMAGE" \
        psql "postgresql://iotgw:s3cret@$ip:5432/iotgw" -tAc 'select 40 + 2' | grep -qx 42 \
        || fail "psql with the password over TCP" || return 1
    if docker run --rm --network "container:$c" "$POSTGRES_IMAGE" \
        psql "postgresql://iotgw:wrong@$ip:5432/iotgw" -tAc 'select 1' >/dev/null 2>&1; then
        fail "psql with a wrong password accepted"; return 1
    fi
    docker rm -f "$c" >/dev/null
}

verify_pubsub() {
    local c="iotgw-verify-pubsub-$$"
    new_test_container "$c"
    docker run -d --name "$c" "$PUBSUB_IMAGE" \
        gcloud beta emulators pubsub start --project=p --host-port=0.0.0.0:8085 >/dev/null || return 1
    wait_log "$c" "[pubsub] INFO: Server started, listening on 8085" 90 stderr || return 1
    # (the base image has no curl: plain HTTP/1.1 over bash's /dev/tcp; the
    # emulator keeps the connection open, hence the timeout around cat)
    docker run --rm --network "container:$c" "$BASE_IMAGE" timeout 20 bash -c '
        exec 3<>/dev/tcp/127.0.0.1/8085
        printf "PUT /v1/projects/p/topics/iotgw-verify HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" >&3
        timeout 5 cat <&3 || true' | grep -q '"projects/p/topics/iotgw-verify"' \
        || fail "PUT /v1/projects/p/topics/iotgw-verify" || return 1
    docker rm -f "$c" >/dev/null
}

verify_one() {
    local key="$1" image="$2"
    log "verifying $image ..."
    if "verify_$key"; then
        log "verified $image: OK"
        record "$image" "verified OK"
    else
        die "verification of $image FAILED"
    fi
}

# --- main --------------------------------------------------------------------
T_START=$(date +%s)
log "selected: $SELECTED (force=$FORCE)"

# Every image is FROM debian:bookworm-slim: make sure it exists.
if selected base; then
    build_one base "$BASE_IMAGE"
elif ! image_exists "$BASE_IMAGE"; then
    log "$BASE_IMAGE missing (needed as FROM)"
    FORCE_SAVE=$FORCE; FORCE=1; build_one base "$BASE_IMAGE"; FORCE=$FORCE_SAVE
fi

selected mosquitto && build_one mosquitto "$MOSQUITTO_IMAGE"
selected moto && build_one moto "$MOTO_IMAGE"
if selected moto && image_exists "$MOTO_IMAGE" && ! image_exists "$MOTO_IMAGE_LATEST"; then
    docker tag "$MOTO_IMAGE" "$MOTO_IMAGE_LATEST"
fi
selected postgres && build_one postgres "$POSTGRES_IMAGE"
selected pubsub && build_one pubsub "$PUBSUB_IMAGE"

if [ "$VERIFY" = 1 ]; then
    selected base && verify_one base "$BASE_IMAGE"
    selected mosquitto && verify_one mosquitto "$MOSQUITTO_IMAGE"
    selected moto && verify_one moto "$MOTO_IMAGE"
    selected postgres && verify_one postgres "$POSTGRES_IMAGE"
    selected pubsub && verify_one pubsub "$PUBSUB_IMAGE"
fi

T_TOTAL=$(( $(date +%s) - T_START ))
log "summary:"
for line in "${SUMMARY[@]}"; do log "  $line"; done
log "total $(fmt_secs "$T_TOTAL") (${T_TOTAL}s)"
