"""FastRTC 0.0.34 itself, for the side-by-side rows of `benchmarks/bench_reply.py` (mode
``fastrtc``): the default app's echo (`server/echo_app.py`, 0.5 s pieces) in FastRTC's own
`Stream(ReplyOnPause(echo))`, served by uvicorn from a separate environment that has
``pip install "fastrtc[vad]==0.0.34"`` (this file imports nothing of ours).

FastRTC downloads its Silero model (``freddyaboulton/silero-vad``, ``silero_vad.onnx``) from
the Hugging Face hub the first time `ReplyOnPause` is built, which cannot work offline. With
``FASTRTC_SILERO_ONNX`` set (bench_reply sets it to the ``silero_vad.onnx`` inside the
installed ``silero-vad`` wheel, the file our ``fastrtc-onnx`` baseline loads), that file is
used instead. That file is Silero v5 (inputs `input`, `state`, `sr`; the model sees each
512-sample window after the previous window's last 64 samples), while FastRTC 0.0.34's
`SileroVADModel` is written for the v4 file on the hub (`input`, `h`, `c`, `sr`): fed the v5
file as it is, every call raises and FastRTC's `vad` returns `inf` seconds of speech, so no
pause is ever found. `SileroVADModel.get_initial_state` and `__call__` are therefore adapted
to v5's inputs (the v5 state plus the 64-sample context, as silero-vad's own `OnnxWrapper`
keeps them), and v5 takes 512-sample windows only, so `ReplyOnPause` gets
`model_options=SileroVadOptions(window_size_samples=512)` (FastRTC's default, 1024, was v4's:
with v4 FastRTC made one call per 64 ms, here one per 32 ms, as our `fastrtc-onnx` baseline
does). FastRTC's calls stay as they are: one onnxruntime call per window, state from zero at
every chunk, on FastRTC's threads. Nothing else of FastRTC changes.

FastRTC's `Stream` is not an ASGI app itself: its routes are mounted on a FastAPI app
(`stream.mount(app)`, as FastRTC's docs show), and uvicorn serves that app:

    FASTRTC_SILERO_ONNX=... /path/to/fastrtc-venv/bin/python -m uvicorn benchmarks.fastrtc_app:app
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from fastapi import FastAPI
from fastrtc import ReplyOnPause, SileroVadOptions, Stream
from fastrtc.pause_detection import silero

_onnx = os.environ.get("FASTRTC_SILERO_ONNX")
if _onnx:
    silero.SileroVADModel.download_model = staticmethod(lambda: _onnx)

_CONTEXT = 64  # samples of the previous window that Silero v5 sees before each 16 kHz window


def _v5_initial_state(self: silero.SileroVADModel, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((2, batch_size, 128), np.float32), np.zeros((batch_size, _CONTEXT), np.float32)


def _v5_call(self: silero.SileroVADModel, x: np.ndarray, state: tuple, sr: int) -> tuple:
    x = np.asarray(x, np.float32)
    if x.ndim == 1:
        x = x[None, :]
    rnn, context = state
    out, rnn = self.session.run(None, {"input": np.concatenate([context, x], axis=1), "state": rnn,
                                       "sr": np.array(sr, dtype=np.int64)})
    return out, (rnn, x[:, -_CONTEXT:])


_model_options = None
if _onnx:
    import onnxruntime

    if {i.name for i in onnxruntime.InferenceSession(_onnx).get_inputs()} == {"input", "state", "sr"}:
        silero.SileroVADModel.get_initial_state = _v5_initial_state
        silero.SileroVADModel.__call__ = _v5_call
        _model_options = SileroVadOptions(window_size_samples=512)


def echo(audio: tuple[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield the utterance back in 0.5 s pieces (as `server.echo_app.echo`)."""
    sr, samples = audio
    step = sr // 2
    for start in range(0, samples.shape[-1], step):
        yield sr, samples[:, start : start + step]


stream = Stream(
    ReplyOnPause(echo, model_options=_model_options),
    modality="audio",
    mode="send-receive",
    concurrency_limit=int(os.environ.get("BATCHRTC_CONCURRENCY", "256")),
)
app = FastAPI()
stream.mount(app)
