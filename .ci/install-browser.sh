#!/usr/bin/env bash
# Browser for tests/test_ui_browser.py: Debian's Chromium, driven by the Playwright Python
# package. Idempotent. Never runs `playwright install` (it downloads a browser from outside
# hosts); the tests launch /usr/bin/chromium through Playwright's executable_path.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

if ! python -c "import playwright" >/dev/null 2>&1; then
  python -m pip install -q "playwright>=1.45"
fi

chromium --version 2>/dev/null || /usr/bin/chromium --version
python -c "from importlib.metadata import version; print('playwright', version('playwright'))"
