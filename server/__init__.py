"""FastRTC-compatible API: `from server import Stream, ReplyOnPause, ...` replaces
`from fastrtc import ...`."""

from .handlers import (
    AsyncAudioVideoStreamHandler,
    AsyncStreamHandler,
    AudioEmitType,
    AudioVideoStreamHandler,
    StreamHandler,
    VideoEmitType,
    VideoStreamHandler,
)
from .pause_detection import (
    ModelOptions,
    PauseDetectionModel,
    SileroVADModel,
    SileroVadOptions,
    get_silero_model,
)
from .reply_on_pause import AlgoOptions, ReplyOnPause
from .stream import Stream, UnknownConnection
from .utils import (
    AdditionalOutputs,
    CloseStream,
    Warning,
    WebRTCData,
    WebRTCError,
    aggregate_bytes_to_16bit,
    async_aggregate_bytes_to_16bit,
    audio_to_bytes,
    audio_to_file,
    audio_to_float32,
    audio_to_int16,
    get_current_context,
    wait_for_item,
)

__all__ = [
    "AdditionalOutputs",
    "AlgoOptions",
    "AsyncAudioVideoStreamHandler",
    "AsyncStreamHandler",
    "AudioEmitType",
    "AudioVideoStreamHandler",
    "CloseStream",
    "ModelOptions",
    "PauseDetectionModel",
    "ReplyOnPause",
    "SileroVADModel",
    "SileroVadOptions",
    "Stream",
    "StreamHandler",
    "UnknownConnection",
    "VideoEmitType",
    "VideoStreamHandler",
    "Warning",
    "WebRTCData",
    "WebRTCError",
    "aggregate_bytes_to_16bit",
    "async_aggregate_bytes_to_16bit",
    "audio_to_bytes",
    "audio_to_file",
    "audio_to_float32",
    "audio_to_int16",
    "get_current_context",
    "get_silero_model",
    "wait_for_item",
]


def __getattr__(name: str) -> object:
    # FastRTC's custom Svelte `WebRTC` Gradio component is not ported: say what to use instead.
    if name == "WebRTC":
        raise ImportError(
            "batchrtc has no `WebRTC` Gradio component (FastRTC's custom Svelte component is "
            "not ported). Build the page from the stream instead: `stream = Stream(handler, "
            "...)`, then extend it with `with stream.ui as demo: ...` (or serve your own "
            "Blocks with `stream.ui = my_blocks`); `stream.webrtc_component` gives the page's "
            "webrtc_id as an event input. /ui serves it."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
