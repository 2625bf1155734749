"""G.711 mu-law, vectorised with numpy (the stdlib `audioop` is gone from Python 3.13)."""

from __future__ import annotations

import numpy as np

_BIAS = 0x84
_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])


def _build_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


_DECODE = _build_decode_table()


def ulaw_decode(data: bytes) -> np.ndarray:
    """mu-law bytes -> int16 samples."""
    # `take`, not fancy indexing: ~5 us instead of ~8 for a 20 ms frame at 48 kHz, and this
    # runs on the event loop for every media message.
    return _DECODE.take(np.frombuffer(data, dtype=np.uint8))


def _encode_formula(samples: np.ndarray) -> np.ndarray:
    """int16 samples -> mu-law codes, bit-exact with `audioop.lin2ulaw(x, 2)` (14-bit G.711)."""
    x = np.asarray(samples, dtype=np.int32) >> 2  # arithmetic shift, as audioop does
    negative = x < 0
    mag = np.minimum(np.where(negative, -x, x), 8159) + (_BIAS >> 2)
    # segment = index of the first bound in (0x3F, 0x7F, ..., 0x1FFF) that mag does not exceed
    seg = np.searchsorted(_SEG_END, mag, side="left")
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))  # out of range: max code
    return (code ^ np.where(negative, 0x7F, 0xFF)).astype(np.uint8)


# Every int16 value's code, indexed by the sample's bits as uint16 (64 KiB): encoding a reply
# frame is one table lookup (~3 us for 20 ms at 24 kHz) instead of the formula (~45 us).
_ENCODE = _encode_formula(np.arange(65536, dtype=np.uint16).view(np.int16))


def ulaw_encode(samples: np.ndarray) -> bytes:
    """int16 samples -> mu-law bytes, bit-exact with `audioop.lin2ulaw(x, 2)` (14-bit G.711)."""
    x = np.asarray(samples)
    if x.dtype != np.int16:  # other integer widths: the formula clips them as audioop would
        return _encode_formula(x).tobytes()
    return _ENCODE[x.reshape(-1).view(np.uint16)].tobytes()
