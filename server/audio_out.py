"""Reply audio for one connection: mono int16 at the client's rate, seamless across chunks."""

from __future__ import annotations

import numpy as np

from models.resample import StreamingResampler

from .utils import audio_to_float32, audio_to_int16, to_mono


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
            self._rs = StreamingResampler(sample_rate, self.target_rate, device="cpu")
            self._hist = np.zeros(self._rs.history_size, dtype=np.float32)
            self._carry = np.zeros(0, dtype=np.float32)
        assert self._rs is not None and self._hist is not None
        x = np.concatenate([self._carry, audio_to_float32(mono)])
        usable = x.size - x.size % self._rs.down
        self._carry = x[usable:]
        if usable == 0:
            return np.zeros(0, dtype=np.int16)
        # numpy, not a torch conv: this runs on the event loop, a few times a second per reply.
        y, self._hist = self._rs.process_numpy(x[:usable], self._hist)
        return audio_to_int16(y)
