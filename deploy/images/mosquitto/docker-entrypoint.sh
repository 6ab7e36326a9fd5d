#!/bin/sh
# Same behaviour as the public eclipse-mosquitto image: when started as root,
# give /mosquitto to the broker user (mosquitto drops privileges to it itself).
set -e

if [ "$(id -u)" = '0' ] && [ -d /mosquitto ]; then
    chown -R mosquitto:mosquitto /mosquitto || true
fi

exec "$@"
