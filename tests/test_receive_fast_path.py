"""The per-frame fast paths of the audio intake: `ReplyOnPause.receive_nowait` (a frame that
completes no hop is buffered without a coroutine chain; `Session.receive` tries it first) and
the WebSocket front end taking a plain media message's payload without a JSON parse."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import websockets

from benchmarks.bench_pauses import RATE, fixture
from server import AsyncStreamHandler, Stream
from server.frontends.media_socket import _plain_media_payload
from server.reply_on_pause import ReplyOnPause
from tests.audio_fixtures import SPEECH_FIXTURES


async def _replies(audio: np.ndarray, fast: bool, handler: ReplyOnPause | None = None) -> tuple[list[int], int]:
    """Indices of the 20 ms frames that started a reply, and how many frames the fast path took."""
    h = handler or ReplyOnPause(lambda a: None, input_sample_rate=RATE)
    step, hits, taken = RATE // 50, [], 0
    try:
        for k, i in enumerate(range(0, audio.size - step + 1, step)):
            before = h.replies_started
            frame = (RATE, audio[None, i:i + step])
            if fast and h.receive_nowait(frame):
                taken += 1
            else:
                await h.receive(frame)
            if h.replies_started != before:
                hits.append(k)
    finally:
        h.shutdown()
    return hits, taken


@pytest.mark.parametrize("name", SPEECH_FIXTURES)
async def test_frames_taken_without_awaiting_find_the_same_turns(name: str) -> None:
    audio = fixture(name).audio
    slow, _ = await _replies(audio, fast=False)
    fast, taken = await _replies(audio, fast=True)
    assert slow and fast == slow  # the same frames start the same replies
    frames = audio.size // (RATE // 50)
    assert taken > 0.7 * frames, f"only {taken} of {frames} frames took the fast path"


class CountsFrames(ReplyOnPause):
    """A subclass with its own `receive`: every frame must reach it."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.seen = 0

    async def receive(self, frame) -> None:
        self.seen += 1
        await super().receive(frame)


async def test_a_subclass_with_its_own_receive_gets_every_frame() -> None:
    h = CountsFrames(lambda a: None, input_sample_rate=RATE)
    audio = fixture(SPEECH_FIXTURES[0]).audio[: RATE * 2]
    _, taken = await _replies(audio, fast=True, handler=h)
    assert taken == 0 and h.seen == audio.size // (RATE // 50)


async def test_the_fast_path_still_drops_frames_of_a_shut_down_handler() -> None:
    h = ReplyOnPause(lambda a: None, input_sample_rate=RATE)
    await h.receive((RATE, np.zeros((1, 320), np.int16)))  # sets the rate
    h.shutdown()
    assert h.receive_nowait((RATE, np.ones((1, 320), np.int16)))
    assert h._state.buffered == 320  # the second frame was dropped, not buffered


def test_plain_media_payload_takes_only_the_two_exact_forms() -> None:
    p = base64.b64encode(bytes(range(256))).decode()
    assert "/" in p  # json.dumps leaves '/' alone; a client may still escape it as '\/'
    assert _plain_media_payload(json.dumps({"event": "media", "media": {"payload": p}})) == p
    compact = json.dumps({"event": "media", "media": {"payload": p}}, separators=(",", ":"))
    assert _plain_media_payload(compact) == p  # FastRTC's browser client (JSON.stringify)
    for other in (
        compact.replace("/", "\\/"),  # an escape: only a JSON parser reads it right
        json.dumps({"event": "media", "media": {"payload": p}, "streamSid": "x"}),  # Twilio
        json.dumps({"event": "media", "media": {"payload": p, "track": "inbound"}}),
        compact + " ",
        json.dumps({"event": "mark", "media": {"payload": p}}),
    ):
        assert _plain_media_payload(other) is None, other


class Recorder(AsyncStreamHandler):
    frames: list[np.ndarray] = []

    def __init__(self) -> None:
        super().__init__(input_sample_rate=8000)

    def copy(self) -> Recorder:
        return Recorder()

    async def receive(self, frame) -> None:
        Recorder.frames.append(frame[1].copy())

    async def emit(self):
        await asyncio.sleep(3600)


async def test_every_form_of_a_media_message_is_decoded_alike(serve) -> None:
    Recorder.frames.clear()
    server = serve(Stream(Recorder(), modality="audio", mode="send-receive", concurrency_limit=2))
    p = base64.b64encode(bytes(range(256)) * 2).decode()  # 512 mu-law samples, '/' and '+' in it
    forms = [
        json.dumps({"event": "media", "media": {"payload": p}}),
        json.dumps({"event": "media", "media": {"payload": p}}, separators=(",", ":")),
        json.dumps({"event": "media", "media": {"payload": p}}, separators=(",", ":")).replace("/", "\\/"),
        json.dumps({"event": "media", "media": {"payload": p, "track": "inbound"}, "sequenceNumber": "3"}),
    ]
    async with websockets.connect(f"{server.ws}/websocket/offer") as ws:
        await ws.send(json.dumps({"event": "start", "websocket_id": "forms"}))
        for text in forms:
            await ws.send(text)
        await ws.send(json.dumps({"event": "media", "media": {"payload": "not base64!"}}))
        err = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert err["type"] == "error" and "base64" in err["message"], err
    assert len(Recorder.frames) == 4
    for f in Recorder.frames[1:]:
        np.testing.assert_array_equal(f, Recorder.frames[0])
    assert Recorder.frames[0].shape == (1, 512)


def _runs_numpy(probs: np.ndarray, threshold: float) -> tuple[list[int], list[int]]:
    """The reference: how the runs were found with numpy (a float32 array against the
    threshold), before the rule's helpers took a Python list."""
    above = (np.asarray(probs, dtype=np.float32) >= threshold).view(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], above, [0]))))
    return edges[::2].tolist(), edges[1::2].tolist()


@pytest.mark.parametrize("threshold", [0.5, 0.35, 0.7])
def test_the_rules_speech_runs_match_numpys(threshold: float) -> None:
    from server.pause_detection import SileroVadOptions

    h = ReplyOnPause(lambda a: None, model_options=SileroVadOptions(threshold=threshold))
    rng = np.random.default_rng(7)
    at = np.float32(threshold)  # probabilities exactly at the threshold, as float32
    for _ in range(2000):
        n = int(rng.integers(0, 40))
        probs = rng.uniform(0, 1, n).astype(np.float32)
        probs[rng.uniform(size=n) < 0.2] = at
        probs[rng.uniform(size=n) < 0.1] = np.nextafter(at, np.float32(0))
        ref = _runs_numpy(probs, threshold)
        for given in (probs, probs.tolist()):  # as the tests and as `_step` pass them
            _, starts, ends = h._speech_runs(given)
            assert (starts, ends) == ref, (probs, threshold)
