#!/usr/bin/env bash
# Installs schemathesis (PyPI), which fuzzes the HTTP API from its OpenAPI document
# (docs/openapi.yaml) in gateway/tests/cli.rs, in a virtual environment:
#
#   bash scripts/install-api-fuzz-deps.sh        # venv at target/api-fuzz-venv
#
# Idempotent: a venv that already has the pinned version is left as it is.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/target/api-fuzz-venv"
python="${PYTHON:-python3}"
version="4.32.5"

say() { printf '[install-api-fuzz-deps] %s\n' "$*"; }

if ! command -v "$python" >/dev/null 2>&1; then
  say "no $python on PATH: install Python 3.9 or newer (with its venv module) first" >&2
  exit 1
fi
if [ -x "$venv/bin/schemathesis" ] && "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
  say "already installed: schemathesis $version in $venv"
  exit 0
fi
say "creating the virtual environment at $venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
say "installing schemathesis==$version from PyPI"
"$venv/bin/python" -m pip install --quiet --progress-bar off "schemathesis==$version"
"$venv/bin/schemathesis" --version
