"""Reply audio for one connection: mono int16 at the client's rate, seamless across chunks."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from models.resample import StreamingResampler

from .utils import audio_to_float32, audio_to_int16, to_mono

# An exact ratio like 16000/16001 would need a polyphase filter of 16,000 branches (~1 GB,
# seconds to design on the event loop). Ratios are taken to the nearest fraction whose
# terms are at most this (every common rate pair, e.g. 11025 -> 48000 = 640/147, is exact;
# an odd rate like 16001 Hz is off by at most ~0.05% in pitch, which nobody hears).
MAX_RATIO_TERM = 1024


def resampling_ratio(orig_sr: int, new_sr: int) -> tuple[int, int]:
    """(up, down) for orig_sr -> new_sr: exact when both terms are at most MAX_RATIO_TERM,
    else the closest fraction whose terms are (a search over 1,024 denominators, ~0.3 ms,
    once per new rate of a session)."""
    exact = Fraction(int(new_sr), int(orig_sr))
    if max(exact.numerator, exact.denominator) <= MAX_RATIO_TERM:
        return exact.numerator, exact.denominator
    target = new_sr / orig_sr
    best = (math.inf, 1, 1)
    for down in range(1, MAX_RATIO_TERM + 1):
        up = min(MAX_RATIO_TERM, max(1, round(target * down)))
        err = abs(up / down - target)
        if err < best[0]:
            best = (err, up, down)
    return best[1], best[2]


class AudioOut:
    """Converts a handler's `(sample_rate, array)` chunks to the connection's output rate.

    Reply audio is one stream per connection and a few chunks a second, so it is resampled
    on the CPU (numpy) with the same polyphase filter the batched input path uses, keeping
    filter history so chunk edges are seamless."""

    def __init__(self, target_rate: int) -> None:
        self.target_rate = target_rate
        self._rate = 0
        self._rs: StreamingResampler | None = None
        self._hist: np.ndarray | None = None
        self._carry = np.zeros(0, dtype=np.float32)

    def convert(self, sample_rate: int, array: np.ndarray) -> np.ndarray:
        mono = to_mono(np.asarray(array))
        if sample_rate == self.target_rate:
            return audio_to_int16(mono)
        if sample_rate != self._rate:
            self._rate = sample_rate
            up, down = resampling_ratio(sample_rate, self.target_rate)
            self._rs = StreamingResampler(down, up, device="cpu")
            self._hist = np.zeros(self._rs.history_size, dtype=np.float32)
            self._carry = np.zeros(0, dtype=np.float32)
        assert self._rs is not None and self._hist is not None
        x = np.concatenate([self._carry, audio_to_float32(mono)])
        usable = x.size - x.size % self._rs.down
        # A copy: a slice (even an empty one) is a view that would keep all of `x` (this
        # chunk as float32, 4 bytes a sample) alive until the connection's next reply chunk.
        self._carry = x[usable:].copy()
        if usable == 0:
            return np.zeros(0, dtype=np.int16)
        # numpy, not a torch conv: this runs on the event loop, a few times a second per reply.
        y, self._hist = self._rs.process_numpy(x[:usable], self._hist)
        return audio_to_int16(y)
