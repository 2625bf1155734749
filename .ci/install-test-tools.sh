#!/usr/bin/env bash
# System tools the tests use: espeak-ng + sox (real speech fixtures and SNR tests), and the
# browser for the /ui test (.ci/install-browser.sh). Idempotent.
set -euo pipefail
if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v sox >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng sox >/dev/null
fi
bash "$(dirname "$0")/install-browser.sh"
