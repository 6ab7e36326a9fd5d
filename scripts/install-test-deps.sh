#!/usr/bin/env bash
# Installs from Debian's packages what scripts beside `cargo test` need; safe to run again:
# Mosquitto for scripts/bench-e2e.sh (the end-to-end benchmark runs a broker process of its
# own; the test suite's brokers are eclipse-mosquitto:2 containers, iotgw-testkit), and
# promtool for scripts/check-observability.sh (run by scripts/test.sh), which checks and
# unit-tests deploy/prometheus/rules.yml.
#
#   mosquitto          the broker bench-e2e.sh starts
#   mosquitto-clients  mosquitto_pub/mosquitto_sub, its publishers and subscriber
#   prometheus         ships promtool; skipped when a promtool is already on PATH (a
#                      Prometheus release tarball, say)
#   perl, make         build OpenSSL from source (the openssl crate, vendored) for the Azure
#                      device simulator (feature azure_device_sim, built by test.sh and by
#                      CI's clippy --all-features), so its binary needs no libssl at run time
set -euo pipefail

packages=(mosquitto mosquitto-clients perl make)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if command -v promtool >/dev/null 2>&1; then
    packages+=("promtool ($(command -v promtool))")
else
    packages+=(prometheus)
    missing+=(prometheus)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-test-deps: already installed: ${packages[*]}"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

echo "install-test-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"

# The package's init scripts may start a system broker on port 1883; the tests start
# their own on free ports and need none, so stop it where a service manager is present.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    $SUDO systemctl stop mosquitto || true
fi
# Likewise the prometheus package's server (port 9090): only its promtool is wanted.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl stop prometheus || true
fi
echo "install-test-deps: done"
