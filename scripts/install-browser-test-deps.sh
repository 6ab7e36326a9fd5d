#!/usr/bin/env bash
# Installs what the console's browser test needs (gateway/tests/cli.rs,
# the_console_works_in_a_real_browser_...): Debian's chromium package, and a venv under
# target/browser-venv with Playwright for Python (driving that system Chromium: no browser
# download) and axe-core for Playwright (the accessibility check). Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[install-browser-test-deps] %s\n' "$*" >&2; }

if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { say "ERROR: chromium is missing and neither root nor sudo is available: install Debian's chromium package"; exit 1; }
        SUDO=sudo
    fi
    say "installing Debian's chromium package"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
fi

venv=target/browser-venv
want="playwright==1.65.3 axe-playwright-python==0.1.8"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import playwright, axe_playwright_python' 2>/dev/null; then
    say "already installed: $(command -v chromium), $venv ($want)"
    exit 0
fi
say "creating $venv with $want (PyPI)"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check $want
say "done: $(command -v chromium), $venv"
