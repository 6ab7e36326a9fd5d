#!/usr/bin/env bash
# Installs what the Azure differential tests drive, in one virtual environment: the
# official Azure IoT Hub service SDK for Python (`azure-iot-hub` from PyPI, for the
# azure_iot_hub provider) and Microsoft's authentication library (`msal`, for the token
# request of the dataverse sink).
#
#   bash scripts/install-azure-test-deps.sh            # venv at target/azure-venv
#   IOTGW_AZURE_VENV=/some/dir bash scripts/install-azure-test-deps.sh
#
# Idempotent: an existing venv that already imports both at the pinned msal version is left
# as it is; one that lacks msal gets it added.
# `azure-iot-hub` 2.x imports `six` without declaring it, so `six` is installed beside it.
# The tests find the venv through IOTGW_AZURE_VENV or at <repo>/target/azure-venv
# (target/ is git-ignored).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${IOTGW_AZURE_VENV:-$repo/target/azure-venv}"
python="${PYTHON:-python3}"
sdk_version="${AZURE_IOT_HUB_VERSION:-2.7.0}"
msal_version="${MSAL_VERSION:-1.39.0}"

say() { printf '[install-azure-test-deps] %s\n' "$*"; }

if ! command -v "$python" >/dev/null 2>&1; then
  say "no $python on PATH: install Python 3.8 or newer (with its venv module) first" >&2
  exit 1
fi

if [ -x "$venv/bin/python" ] && "$venv/bin/python" - <<'PY' >/dev/null 2>&1
import six  # noqa: F401  (azure-iot-hub needs it but does not declare it)
from azure.iot.hub import IoTHubRegistryManager  # noqa: F401
PY
then
  if "$venv/bin/python" -c "import msal, sys; sys.exit(msal.__version__ != '$msal_version')" >/dev/null 2>&1; then
    say "already installed: azure-iot-hub $("$venv/bin/python" -m pip show azure-iot-hub 2>/dev/null | sed -n 's/^Version: //p'), msal $msal_version in $venv"
    exit 0
  fi
  say "adding msal==$msal_version to $venv"
  "$venv/bin/python" -m pip install --progress-bar off "msal==$msal_version"
  "$venv/bin/python" -c "import msal; print('[install-azure-test-deps] msal', msal.__version__)"
  say "done: $venv"
  exit 0
fi

say "creating the virtual environment at $venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
say "upgrading pip"
"$venv/bin/python" -m pip install --quiet --upgrade pip
say "installing azure-iot-hub==$sdk_version, six and msal==$msal_version from PyPI (uamqp wheels included)"
"$venv/bin/python" -m pip install --progress-bar off "azure-iot-hub==$sdk_version" six "msal==$msal_version"
say "checking the import"
"$venv/bin/python" - <<'PY'
import azure.iot.hub, six  # noqa: F401
from azure.iot.hub import IoTHubRegistryManager  # noqa: F401
import msal
print("[install-azure-test-deps] msal", msal.__version__, "available (dataverse token differential test)")
try:
    import uamqp  # noqa: F401
    print("[install-azure-test-deps] uamqp", uamqp.__version__, "available (C2D differential test)")
except Exception as e:  # the REST tests do not need it
    print("[install-azure-test-deps] uamqp NOT importable:", e)
PY
say "done: $venv"
