#!/usr/bin/env bash
# System tools the tests use: espeak-ng + sox (real speech fixtures and SNR tests), coturn
# (`turnserver`: relay-only WebRTC in tests/test_turn.py), and the browser for the /ui test
# (.ci/install-browser.sh). Idempotent.
set -euo pipefail
if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v sox >/dev/null 2>&1 \
    || ! command -v turnserver >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng sox coturn >/dev/null
  # The tests start their own `turnserver` on loopback; the package's system service (on
  # 0.0.0.0:3478 where systemd runs) is not wanted.
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now coturn >/dev/null 2>&1 || true; fi
fi
bash "$(dirname "$0")/install-browser.sh"
