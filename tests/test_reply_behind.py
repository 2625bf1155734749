"""ReplyOnPause when the VAD answers later than the audio lasts (a loaded engine): hops are
judged in the background while `receive` keeps taking frames, so the session keeps pace with
its client instead of falling further behind with every hop."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from benchmarks.bench_pauses import RATE, fixture
from server.reply_on_pause import MAX_WAITING_AUDIO_S, ReplyOnPause
from server.vad_engine import VADStream


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def send(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture
def slow_vad(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The real VAD, answering 0.3 s late; records each call's sample count."""
    process = VADStream.process
    calls: list[int] = []

    async def slow(self: VADStream, samples: np.ndarray, **kw) -> np.ndarray:
        calls.append(np.asarray(samples).size)
        await asyncio.sleep(0.3)
        return await process(self, samples, **kw)

    monkeypatch.setattr(VADStream, "process", slow)
    return calls


async def test_a_slow_vad_does_not_hold_up_the_frames(slow_vad: list[int]) -> None:
    rec = fixture("speech_pause_speech_16k.wav")
    handler = ReplyOnPause(lambda a: None, input_sample_rate=RATE)
    log = _Log()
    handler.set_channel(log)  # type: ignore[arg-type]
    step = RATE // 50
    blocked, t0 = 0.0, time.monotonic()
    try:
        for k, i in enumerate(range(0, rec.audio.size - step + 1, step)):
            await asyncio.sleep(max(0.0, t0 + k * 0.02 - time.monotonic()))  # real time
            t = time.monotonic()
            await handler.receive((RATE, rec.audio[None, i:i + step]))
            blocked += time.monotonic() - t
        lag = time.monotonic() - t0 - rec.audio.size / RATE
        print(f"blocked {blocked:.2f} s of {rec.audio.size / RATE:.2f} s, lag {lag:.3f} s")
        while handler._hops is not None:
            await asyncio.sleep(0.01)
    finally:
        handler.shutdown()
    # Frames wait only while a hop is judged in turn, which happens while a hop lasts longer
    # than the VAD takes (0.6 s chunks before a turn, not 96 ms hops in one).
    assert blocked < 0.4 * rec.audio.size / RATE, blocked
    assert lag < 0.35, lag  # the session kept pace with its client
    # Hops of 96 ms judged one by one would need ~3 s of VAD round trips per second of audio.
    assert len(slow_vad) < rec.audio.size / RATE / 0.3 + 5, slow_vad
    assert max(slow_vad) > 3 * 0.096 * RATE  # hops merged what came meanwhile
    assert sum('"pause_detected"' in line for line in log.lines) == 2, log.lines


async def test_waiting_audio_is_bounded(slow_vad: list[int]) -> None:
    """Frames sent faster than real time: past MAX_WAITING_AUDIO_S waiting, `receive` waits
    for the hop under way (the front end then stops reading this client)."""
    handler = ReplyOnPause(lambda a: None, input_sample_rate=RATE)
    handler.set_channel(_Log())  # type: ignore[arg-type]
    handler._behind = True
    noise = (np.random.default_rng(1).standard_normal(RATE * 6) * 3000).astype(np.int16)
    step = RATE // 50
    waited = 0
    try:
        for i in range(0, noise.size - step + 1, step):
            t = time.monotonic()
            await handler.receive((RATE, noise[None, i:i + step]))
            waited += time.monotonic() - t > 0.1
            st = handler._state
            assert st.buffered + st.held_len <= (MAX_WAITING_AUDIO_S + 0.02) * RATE
    finally:
        handler.shutdown()
    assert waited >= 1


async def test_an_error_in_a_background_hop_is_raised_by_the_next_receive(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: VADStream, samples: np.ndarray, **kw) -> np.ndarray:
        raise RuntimeError("the VAD broke")

    monkeypatch.setattr(VADStream, "process", broken)
    handler = ReplyOnPause(lambda a: None, input_sample_rate=RATE)
    handler.set_channel(_Log())  # type: ignore[arg-type]
    handler._behind = True
    noise = (np.random.default_rng(2).standard_normal(RATE) * 3000).astype(np.int16)
    step = RATE // 50
    try:
        with pytest.raises(RuntimeError, match="the VAD broke"):
            for i in range(0, noise.size - step + 1, step):
                await handler.receive((RATE, noise[None, i:i + step]))
                await asyncio.sleep(0)
    finally:
        handler.shutdown()


async def test_shutdown_cancels_the_hop_under_way(slow_vad: list[int]) -> None:
    handler = ReplyOnPause(lambda a: None, input_sample_rate=RATE)
    handler.set_channel(_Log())  # type: ignore[arg-type]
    handler._behind = True
    noise = (np.random.default_rng(3).standard_normal(RATE) * 3000).astype(np.int16)
    step = RATE // 50
    for i in range(0, noise.size - step + 1, step):
        await handler.receive((RATE, noise[None, i:i + step]))
    task = handler._hops
    assert task is not None and not task.done()
    handler.shutdown()
    await asyncio.sleep(0.01)
    assert task.cancelled() and handler._hops is None
