#!/usr/bin/env bash
# The one command that runs every test, emulators included:
#
#   ./scripts/test.sh            [extra args passed to cargo test]
#
# 1. checks the Grafana dashboard and the Prometheus alert rules under deploy/
#    (scripts/check-observability.sh), first installing promtool with Debian's prometheus
#    package (scripts/install-test-deps.sh) when it is missing;
# 2. installs what the tests need beside Docker: Microsoft's Python service SDK for the
#    Azure differential tests from PyPI (scripts/install-azure-test-deps.sh) and
#    schemathesis for the API fuzzing (scripts/install-api-fuzz-deps.sh), Chromium and
#    Playwright for the console's browser test (scripts/install-browser-test-deps.sh); every broker
#    and emulator is a container started by iotgw-testkit (testkit/);
# 3. makes sure the emulator images exist in Docker under their public names
#    (eclipse-mosquitto:2, motoserver/moto:5.1.4, postgres:15,
#    gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators): a missing one is pulled;
#    when no registry answers (our CI), deploy/images/build-local-images.sh builds it
#    locally under the same name. Images already present are used as they are, so a
#    second run builds nothing;
# 4. removes test containers left behind by runs that are gone (label org.iotgw.test=1);
# 5. runs the whole workspace's tests with `cargo test`, with every provider that has a
#    conformance fixture (tests/src/conformance/fixtures/<kind>.rs) turned on (and, with
#    azure_iot_hub, the gateway's Azure device simulator, feature azure_device_sim);
# 6. prints the conformance matrix (scenario x provider) and the timings.
#
# cargo test, not cargo nextest: nextest runs every test in a process of its own, so each
# test would start its own emulator containers instead of sharing one per test binary,
# and it cannot list the harness = false binaries (tests/tests/conformance.rs,
# tests/tests/emulators.rs) that print the matrix.
#
# Under CI=true a test that needs Docker fails when Docker is unreachable; elsewhere it
# is skipped with a SKIPPED: line.
#
# Environment:
#   IOTGW_TEST_PROVIDERS  space-separated provider kinds to build for the conformance suite
#                         (default: mqtt plus every kind with a fixture file)
#   IOTGW_NO_PULL=1       never try a registry; build missing images locally
#   IOTGW_PULL_TIMEOUT    seconds one `docker pull` may take (default 120)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

start=$(date +%s)
say() { printf '[test] %s\n' "$*" >&2; }

LABEL="org.iotgw.test"
IMAGES=(
    "mosquitto eclipse-mosquitto:2"
    "moto motoserver/moto:5.1.4"
    "postgres postgres:15"
    "pubsub gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators"
)

# Removes the labelled test containers of this machine whose test process is gone.
remove_stale_containers() {
    local host ids id pid chost n=0
    host="$(cat /proc/sys/kernel/hostname 2>/dev/null || hostname)"
    ids="$(docker ps -aq --filter "label=$LABEL=1" 2>/dev/null || true)"
    for id in $ids; do
        pid="$(docker inspect -f "{{index .Config.Labels \"$LABEL.pid\"}}" "$id" 2>/dev/null || true)"
        chost="$(docker inspect -f "{{index .Config.Labels \"$LABEL.host\"}}" "$id" 2>/dev/null || true)"
        [ "$chost" = "$host" ] || continue
        if [ -z "$pid" ] || [ ! -d "/proc/$pid" ]; then
            docker rm -f -v "$id" >/dev/null 2>&1 && n=$((n + 1))
        fi
    done
    [ "$n" -eq 0 ] || say "removed $n test container(s) left by earlier runs"
}

if ! command -v promtool >/dev/null 2>&1; then
    say "installing promtool (Debian's prometheus package), which checks the alert rules (scripts/install-test-deps.sh)"
    bash scripts/install-test-deps.sh
fi
say "checking the Grafana dashboard and the Prometheus alert rules with promtool (scripts/check-observability.sh)"
bash scripts/check-observability.sh

say "installing the official Azure IoT Hub Python SDK the azure_iot_hub differential tests compare against (PyPI, venv under target/)"
bash scripts/install-azure-test-deps.sh
say "installing Chromium (Debian) and Playwright + axe-core (PyPI, venv under target/) for the console's browser test"
bash scripts/install-browser-test-deps.sh
say "installing schemathesis, which fuzzes the API from its generated OpenAPI document, and openapi-spec-validator (PyPI, venv under target/)"
bash scripts/install-api-fuzz-deps.sh

images_secs=0
docker_ok=0
if docker info >/dev/null 2>&1; then
    docker_ok=1
    t0=$(date +%s)
    say "Docker reachable: making sure the emulator images exist"
    missing=()
    for entry in "${IMAGES[@]}"; do
        key="${entry%% *}"
        image="${entry#* }"
        if docker image inspect "$image" >/dev/null 2>&1; then
            say "  $image: present"
        elif [ "${IOTGW_NO_PULL:-}" != 1 ] \
            && timeout "${IOTGW_PULL_TIMEOUT:-120}" docker pull -q "$image" >/dev/null 2>&1; then
            say "  $image: pulled"
        else
            say "  $image: missing and not pullable: will build it locally"
            missing+=("$key")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        IOTGW_IMAGES="${missing[*]}" bash deploy/images/build-local-images.sh
    fi
    images_secs=$(( $(date +%s) - t0 ))
    say "images ready in ${images_secs} s"
    remove_stale_containers
elif [ "${CI:-}" = "true" ]; then
    say "ERROR: CI=true but Docker is unreachable (docker info failed): emulator tests cannot run"
    exit 1
else
    say "Docker unreachable: emulator tests will be skipped (they fail under CI=true)"
fi

# Providers for the conformance suite: mqtt (default feature) plus each kind with a fixture.
providers="${IOTGW_TEST_PROVIDERS:-}"
if [ -z "$providers" ]; then
    providers="mqtt"
    for kind in aws_iot_core gcp_pubsub azure_iot_hub; do
        [ -f "tests/src/conformance/fixtures/$kind.rs" ] && providers="$providers $kind"
    done
fi
features=""
for kind in $providers; do
    features="$features iotgw-tests/$kind"
done
# With azure_iot_hub, the gateway also builds its Azure device simulator (the azure_iot_sdk
# client), whose test checks what the SDK sends against a stand-in for the hub.
case " $providers " in
    *" azure_iot_hub "*) features="$features iotgw/azure_device_sim" ;;
esac
features="${features# }"

target_dir="${CARGO_TARGET_DIR:-target}"
matrix_file="$target_dir/tmp/conformance-matrix.txt"
rm -f "$matrix_file"

say "running the test suite (conformance providers: $providers)"
t0=$(date +%s)
status=0
cargo test --workspace --no-fail-fast --features "$features" "$@" || status=$?
# Tests that time a reconnect and miss their deadline when the machine is saturated by the
# parallel run above (2 cores): each is #[ignore]d with that reason and run here, alone,
# from the binaries already built.
QUIET_TESTS=(
    azure_iot_hub::tests::event_hubs::starting_at_latest_loses_nothing_published_while_the_connection_is_down
    azure_iot_hub::tests::event_hubs::events_published_after_the_connections_drop_still_arrive
)
if [ "$#" -eq 0 ]; then
    say "running the tests that need a quiet machine, one at a time: ${QUIET_TESTS[*]}"
    cargo test --workspace --no-fail-fast --features "$features" --lib -- \
        --ignored --exact --test-threads=1 "${QUIET_TESTS[@]}" || status=$?
    # The same for end-to-end tests of the binary that race device or replica timing.
    QUIET_INTEGRATION=(
        three_replicas_lose_nothing_when_one_is_killed_mid_stream
        with_a_broker_down_new_devices_fail_over_and_commands_wait_for_it_or_expire
    )
    say "running the end-to-end tests that need a quiet machine, one at a time: ${QUIET_INTEGRATION[*]}"
    cargo test --workspace --no-fail-fast --features "$features" --test hybrid --test faults -- \
        --ignored --exact --test-threads=1 "${QUIET_INTEGRATION[@]}" || status=$?
fi
tests_secs=$(( $(date +%s) - t0 ))

if [ "$docker_ok" = 1 ]; then
    remove_stale_containers
fi
if [ -f "$matrix_file" ]; then
    printf '\n' >&2
    cat "$matrix_file" >&2
fi
total=$(( $(date +%s) - start ))
say "timings: images ${images_secs} s, build + tests ${tests_secs} s, total ${total} s"
if [ "$status" -ne 0 ]; then
    say "FAILED (cargo test exited with $status)"
    exit "$status"
fi
say "all tests passed in ${total} s"
