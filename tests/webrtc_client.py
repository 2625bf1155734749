"""The aiortc client the tests use (it lives with the benchmarks, which use it too)."""

from benchmarks.webrtc_client import AudioSource, Client, FrameSource, connect

__all__ = ["AudioSource", "Client", "FrameSource", "connect"]
