#!/usr/bin/env bash
# The one command that runs every test, emulators included:
#
#   ./scripts/test.sh            [extra args passed to the test runner]
#
# 1. installs what the tests need from Debian's packages (Mosquitto with its dynamic
#    security plugin) — scripts/install-test-deps.sh;
# 2. makes sure the emulator images exist in Docker: on a machine with a registry the tests
#    pull the public images; without one (our CI) deploy/images/build-local-images.sh builds
#    them locally under the same names (skipped when present);
# 3. runs the whole workspace's tests (cargo nextest when installed, else cargo test).
#
# Under CI=true a test that needs Docker fails when Docker is unreachable; elsewhere it
# is skipped with a message.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

start=$(date +%s)
say() { printf '[test] %s\n' "$*" >&2; }

say "installing test dependencies (Debian packages)"
bash scripts/install-test-deps.sh

if docker info >/dev/null 2>&1; then
    say "Docker reachable: making sure the emulator images exist"
    bash deploy/images/build-local-images.sh
elif [ "${CI:-}" = "true" ]; then
    say "ERROR: CI=true but Docker is unreachable (docker info failed): emulator tests cannot run"
    exit 1
else
    say "Docker unreachable: emulator tests will be skipped (they fail under CI=true)"
fi

say "running the test suite"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
say "all tests passed in $(( $(date +%s) - start )) s"
