"""Where local speech-model files are looked for (nothing is ever downloaded).

`BATCHRTC_MODEL_DIR` (default `~/.cache/batchrtc/models`) holds one folder per model:
`moonshine/base/`, `moonshine/tiny/` (Moonshine's ONNX `encoder_model.onnx` and
`decoder_model_merged.onnx`) and `kokoro/` (`kokoro-v1.0.onnx`, `voices-v1.0.bin`). See
docs/speech_models.md.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "BATCHRTC_MODEL_DIR"
DEFAULT_DIR = Path("~/.cache/batchrtc/models")


def model_dir() -> Path:
    """The folder local model files are read from (read on every call: tests set the env)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def find_files(subdir: str, names: tuple[str, ...]) -> Path | None:
    """`model_dir()/subdir` when it holds every file in `names`, else None."""
    folder = model_dir() / subdir
    if all((folder / n).is_file() for n in names):
        return folder
    return None
