"""mu-law and WAV helpers the WebSocket and telephone examples share (the docs pages inline
this file into each, so every served example is one self-contained script)."""
import wave

import numpy as np
from scipy.signal import resample_poly


def ulaw_encode(pcm):
    """int16 samples -> G.711 mu-law bytes (the same bytes as audioop.lin2ulaw)."""
    x = pcm.astype(np.int32) >> 2
    mag = np.minimum(np.abs(x), 8158) + 33
    exp = np.floor(np.log2(mag)).astype(np.int32) - 5
    code = (exp << 4) | ((mag >> (exp + 1)) & 0x0F)
    return (code ^ np.where(x < 0, 0x7F, 0xFF)).astype(np.uint8).tobytes()


def ulaw_decode(data):
    """G.711 mu-law bytes -> int16 samples."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    exp = (u >> 4) & 0x07
    mag = ((((u & 0x0F) << 3) + 0x84) << exp) - 0x84
    return np.where(u & 0x80, -mag, mag).astype(np.int16)


def load_wav(path, rate):
    """A 16-bit PCM WAV file as mono int16 samples at `rate`."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise SystemExit("expected a 16-bit PCM WAV file")
        src = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        x = x.reshape(-1, w.getnchannels())[:, 0]
    if src != rate:
        x = resample_poly(x.astype(np.float64), rate, src)
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)
