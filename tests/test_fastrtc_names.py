"""Every name FastRTC 0.0.34 exports resolves from `server`: an app that changes its import
finds each of them (`WebRTC`, a Gradio component not ported, raises an ImportError that says
what to use instead)."""
from __future__ import annotations

import importlib

import pytest

# fastrtc/__init__.py's __all__ in FastRTC 0.0.34 (the wheel on PyPI), sorted.
FASTRTC_ALL = [
    "AdditionalOutputs",
    "aggregate_bytes_to_16bit",
    "AlgoOptions",
    "async_aggregate_bytes_to_16bit",
    "AsyncAudioVideoStreamHandler",
    "AsyncStreamHandler",
    "audio_to_bytes",
    "audio_to_file",
    "audio_to_float32",
    "audio_to_int16",
    "AudioEmitType",
    "AudioVideoStreamHandler",
    "CartesiaTTSOptions",
    "CloseStream",
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
    "get_twilio_turn_credentials",
    "KokoroTTSOptions",
    "ModelOptions",
    "MoonshineSTT",
    "PauseDetectionModel",
    "ReplyOnPause",
    "ReplyOnStopWords",
    "SileroVadOptions",
    "Stream",
    "StreamHandler",
    "UIArgs",
    "VideoEmitType",
    "VideoStreamHandler",
    "wait_for_item",
    "Warning",
    "WebRTC",
    "WebRTCData",
    "WebRTCError",
]


@pytest.mark.parametrize("name", FASTRTC_ALL)
def test_fastrtc_name_resolves(name: str) -> None:
    server = importlib.import_module("server")
    if name == "WebRTC":
        with pytest.raises(ImportError, match="stream.ui"):
            getattr(server, name)
        return
    assert getattr(server, name) is not None
    assert name in server.__all__


def test_fastrtc_star_import_leaves_out_webrtc_only() -> None:
    namespace: dict[str, object] = {}
    exec("from server import *", namespace)
    assert set(FASTRTC_ALL) - set(namespace) == {"WebRTC"}
