"""FastRTC-compatible API: `from server import Stream, ReplyOnPause, ...` replaces
`from fastrtc import ...`."""

from .config import UIArgs
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
from .reply_on_stopwords import ReplyOnStopWords
from .speech_to_text import MoonshineSTT, STTModel, get_stt_model
from .stream import Stream, UnknownConnection
from .text_to_speech import CartesiaTTSOptions, KokoroTTSOptions, TTSModel, get_tts_model
from .turn import (
    TurnCredentialsError,
    get_cloudflare_turn_credentials,
    get_cloudflare_turn_credentials_async,
    get_hf_turn_credentials,
    get_hf_turn_credentials_async,
    get_turn_credentials,
    get_turn_credentials_async,
    get_turn_rest_credentials,
    get_twilio_turn_credentials,
)
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
    "CartesiaTTSOptions",
    "CloseStream",
    "KokoroTTSOptions",
    "ModelOptions",
    "MoonshineSTT",
    "PauseDetectionModel",
    "ReplyOnPause",
    "ReplyOnStopWords",
    "STTModel",
    "SileroVADModel",
    "SileroVadOptions",
    "Stream",
    "StreamHandler",
    "TTSModel",
    "TurnCredentialsError",
    "UIArgs",
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
    "get_cloudflare_turn_credentials",
    "get_cloudflare_turn_credentials_async",
    "get_current_context",
    "get_hf_turn_credentials",
    "get_hf_turn_credentials_async",
    "get_silero_model",
    "get_stt_model",
    "get_tts_model",
    "get_turn_credentials",
    "get_turn_credentials_async",
    "get_turn_rest_credentials",
    "get_twilio_turn_credentials",
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
