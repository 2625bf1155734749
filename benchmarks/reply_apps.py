"""Apps for `benchmarks/bench_reply.py` that are not the default one.

`fastrtc_onnx_stream` (a uvicorn `--factory` target) is the baseline a FastRTC user runs:
the default echo app's `ReplyOnPause(echo)`, but with `model=get_silero_model()`, so every
connection's 0.6 s chunks go to Silero through one onnxruntime session, one call per
connection per chunk on a worker thread (FastRTC 0.0.34's `SileroVADModel`), instead of the
shared batched engine. `tumbling_stream` is the default app with FastRTC's tumbling 0.6 s
chunks for pause detection instead of the default sliding window (issue 16's comparison).
"""

from __future__ import annotations

import os

from server import AlgoOptions, ReplyOnPause, Stream, get_silero_model
from server.echo_app import echo


def fastrtc_onnx_stream() -> Stream:
    return Stream(
        ReplyOnPause(echo, model=get_silero_model()),
        modality="audio",
        mode="send-receive",
        concurrency_limit=int(os.environ.get("BATCHRTC_CONCURRENCY", "256")),
    )


def tumbling_stream() -> Stream:
    return Stream(
        ReplyOnPause(echo, algo_options=AlgoOptions(pause_window="tumbling")),
        modality="audio",
        mode="send-receive",
        concurrency_limit=int(os.environ.get("BATCHRTC_CONCURRENCY", "256")),
    )
