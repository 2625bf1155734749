"""The FastRTC WebSocket client the tests use (it lives with the benchmarks, which use it too)."""

from benchmarks.ws_client import Received, stream_audio

__all__ = ["Received", "stream_audio"]
