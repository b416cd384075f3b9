#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the report tests (tests/pipeline/test_inspect.py).
#
# Idempotent: does nothing when a chromium binary is already on PATH (or at /usr/bin/chromium).
# Needs root (or sudo) and access to the Debian apt mirrors. fonts-dejavu-core gives the
# report's sans-serif text real glyphs in screenshots.
#
# Usage: scripts/install_chromium.sh
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(command -v chromium || echo /usr/bin/chromium)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install_chromium.sh: needs root or sudo to run apt-get" >&2
    exit 2
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium.sh: apt-get not found; install the 'chromium' package with your system's package manager" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
echo "chromium installed: $(command -v chromium)"
