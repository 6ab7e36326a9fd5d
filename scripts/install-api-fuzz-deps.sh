#!/usr/bin/env bash
# Installs the API's OpenAPI test tools from PyPI in a virtual environment, for
# gateway/tests/cli.rs: schemathesis, which fuzzes the HTTP API from its generated OpenAPI
# document (GET /api/openapi.json), and openapi-spec-validator, which checks that document
# against the OpenAPI 3.1 specification:
#
#   bash scripts/install-api-fuzz-deps.sh        # venv at target/api-fuzz-venv
#
# Idempotent: a venv that already has the pinned versions is left as it is.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/target/api-fuzz-venv"
python="${PYTHON:-python3}"
version="4.32.5"
validator_version="0.9.0"

say() { printf '[install-api-fuzz-deps] %s\n' "$*"; }

installed() {
  [ -x "$venv/bin/schemathesis" ] && [ -x "$venv/bin/openapi-spec-validator" ] \
    && "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version" \
    && "$venv/bin/python" -m pip show openapi-spec-validator 2>/dev/null | grep -qx "Version: $validator_version"
}

if ! command -v "$python" >/dev/null 2>&1; then
  say "no $python on PATH: install Python 3.9 or newer (with its venv module) first" >&2
  exit 1
fi
if installed; then
  say "already installed: schemathesis $version and openapi-spec-validator $validator_version in $venv"
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  say "creating the virtual environment at $venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
say "installing schemathesis==$version and openapi-spec-validator==$validator_version from PyPI"
"$venv/bin/python" -m pip install --quiet --progress-bar off \
  "schemathesis==$version" "openapi-spec-validator==$validator_version"
"$venv/bin/schemathesis" --version
"$venv/bin/python" -m pip show openapi-spec-validator | grep '^Version'
