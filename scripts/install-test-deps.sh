#!/usr/bin/env bash
# Installs what the test suites need from Debian's packages; safe to run again.
#
#   mosquitto          the broker the mqtt provider tests start (with its dynamic
#                      security plugin, mosquitto_dynamic_security.so)
#   mosquitto-clients  mosquitto_pub/mosquitto_sub, and mosquitto_ctrl on Debian
#                      bookworm, used to create the dynsec.json of the dynsec tests
set -euo pipefail

packages=(mosquitto mosquitto-clients)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

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
echo "install-test-deps: done"
