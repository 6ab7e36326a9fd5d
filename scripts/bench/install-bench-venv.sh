#!/usr/bin/env bash
# Installs what the Python side of scripts/bench-e2e.sh needs: paho-mqtt 2.x from PyPI in
# a virtual environment (sqlite3 comes with Python).
#
#   bash scripts/bench/install-bench-venv.sh            # venv at target/bench-venv
#   IOTGW_BENCH_VENV=/some/dir bash scripts/bench/install-bench-venv.sh
#
# Idempotent: an existing venv that already imports paho-mqtt 2.x is left as it is.
# target/ is git-ignored.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${IOTGW_BENCH_VENV:-$repo/target/bench-venv}"
python="${PYTHON:-python3}"
paho_spec="${PAHO_MQTT_SPEC:-paho-mqtt>=2,<3}"

say() { printf '[install-bench-venv] %s\n' "$*" >&2; }

check() {
    "$venv/bin/python" - <<'PY' >/dev/null 2>&1
import sqlite3  # noqa: F401
import paho.mqtt
assert int(paho.mqtt.__version__.split(".")[0]) == 2
PY
}

if [ -x "$venv/bin/python" ] && check; then
    exit 0
fi

if ! command -v "$python" >/dev/null 2>&1; then
    say "no $python on PATH: install Python 3.8 or newer (with its venv module) first"
    exit 1
fi

say "creating the virtual environment at $venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
say "installing $paho_spec from PyPI"
"$venv/bin/python" -m pip install --quiet --progress-bar off "$paho_spec"
if ! check; then
    say "paho-mqtt 2.x is not importable from $venv"
    exit 1
fi
say "done: paho-mqtt $("$venv/bin/python" -c 'import paho.mqtt; print(paho.mqtt.__version__)') in $venv"
