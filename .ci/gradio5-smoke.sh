#!/usr/bin/env bash
# The Gradio 5 line (FastRTC pins gradio<6, so its users' apps use the Gradio 5 API): a venv
# over the system packages with the latest gradio 5.x (the system Python keeps its Gradio),
# then the tests that depend on Gradio (the /ui page in headless Chromium too: run
# .ci/install-browser.sh first) or on the additional-inputs protocol. Idempotent.
set -euo pipefail
VENV="${GRADIO5_VENV:-/tmp/batchrtc-gradio5}"
if [ ! -x "$VENV/bin/python" ]; then
  python -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q "gradio>=5,<6"
"$VENV/bin/python" -c "import gradio; print('gradio', gradio.__version__)"
cd "$(dirname "$0")/.."
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_gradio_lines.py tests/test_ui_browser.py tests/test_stream_ui_browser.py \
  tests/test_reply_inputs.py "$@"
