"""ReplyOnPause's additional inputs as in FastRTC, over WebSocket and WebRTC: each turn the
server asks (`send_input`), waits for the values the client sets (here, as in FastRTC's
demos, by POSTing to a route that calls `stream.set_input`) and calls the handler with
them -- never with the components' defaults. And `trigger_response()`: a reply now, without
waiting for a pause. Real uvicorn server, real WebSocket and aiortc clients, real speech."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from pydantic import BaseModel

from server import ReplyOnPause, Stream
from tests.test_websocket_reply import speech_48k
from tests.webrtc_client import AudioSource, connect
from tests.ws_client import stream_audio

FIXTURE = "speech_pause_speech_16k.wav"  # two utterances: two turns


class Gain(BaseModel):
    webrtc_id: str
    gain: float


class Placeholder:  # stands in for a gradio component: its `.value` is the default
    value = 0.25


def gain_stream(seen: list) -> Stream:
    def reply(audio, gain):
        seen.append((time.monotonic(), gain))
        yield audio

    stream = Stream(ReplyOnPause(reply), modality="audio", concurrency_limit=2,
                    additional_inputs=[Placeholder()])

    @stream.post("/input_hook")
    async def input_hook(body: Gain) -> dict:
        stream.set_input(body.webrtc_id, body.gain)
        return {"status": "ok"}

    return stream


class Answerer:
    """Answers each `send_input` after a delay, with the next of `values`."""

    def __init__(self, http: httpx.AsyncClient, url: str, webrtc_id: str, values: list[float]) -> None:
        self.http, self.url, self.webrtc_id, self.values = http, url, webrtc_id, list(values)
        self.answered: list[tuple[float, float]] = []  # (when sent, value)

    async def answer(self) -> None:
        await asyncio.sleep(0.3)  # the turn must wait for us
        value = self.values.pop(0)
        self.answered.append((time.monotonic(), value))  # just before the value is sent
        r = await self.http.post(f"{self.url}/input_hook", json={"webrtc_id": self.webrtc_id, "gain": value})
        assert r.status_code == 200, r.text


def check_turns(seen: list, answerer: Answerer, messages: list[dict]) -> None:
    asks = sum(1 for m in messages if m.get("type") == "send_input")
    turns = sum(1 for m in messages if m.get("type") == "log" and m.get("data") == "pause_detected")
    assert asks == turns >= 2, (asks, turns)  # asked once every turn, as FastRTC does
    assert [g for _, g in seen] == [0.5, 0.9], seen  # the client's values, not the default 0.25
    for (called, _), (answered, _) in zip(seen, answerer.answered):
        assert called >= answered  # the handler waited for the answer


async def test_websocket_turns_ask_wait_and_get_the_clients_values(serve) -> None:
    seen: list = []
    server = serve(gain_stream(seen))
    async with httpx.AsyncClient(timeout=10) as http:
        answerer = Answerer(http, server.http, "ws-in", [0.5, 0.9])

        async def on_message(msg: dict) -> None:
            if msg.get("type") == "send_input":
                await answerer.answer()

        rec = await stream_audio(f"{server.ws}/websocket/offer", "ws-in", speech_48k(FIXTURE), 48000,
                                 tail_s=2.5, on_message=on_message)
    check_turns(seen, answerer, rec.messages)
    assert len(rec.replies()) == 2
    assert not [m for m in rec.messages if m.get("type") == "error"]


async def test_webrtc_turns_ask_wait_and_get_the_clients_values(serve) -> None:
    seen: list = []
    stream = gain_stream(seen)
    server = serve(stream)
    pcm = speech_48k(FIXTURE, tail_s=2.5)
    async with httpx.AsyncClient(timeout=10) as http:
        client, answer = await connect(server.http, "rtc-in", audio=AudioSource(pcm), recv_audio=True)
        assert "sdp" in answer, answer
        answerer = Answerer(http, server.http, "rtc-in", [0.5, 0.9])
        try:
            handled = 0
            deadline = time.monotonic() + pcm.size / 48000 + 5
            while time.monotonic() < deadline and len(seen) < 2:
                asks = [m for m in client.messages if m.get("type") == "send_input"]
                if len(asks) > handled:
                    handled += 1
                    await answerer.answer()
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            messages = list(client.messages)
        finally:
            await client.close()
    check_turns(seen, answerer, messages)
    assert not [m for m in client.messages if m.get("type") == "error"]


async def test_values_set_before_a_turn_are_used_without_waiting(serve) -> None:
    """FastRTC's args_set: values that arrived since the previous turn serve this one (the
    UI pushes every change); `send_input` is still sent."""
    seen: list = []
    stream = gain_stream(seen)
    server = serve(stream)

    async def set_early() -> None:
        await asyncio.sleep(0.3)
        stream.set_input("early", 0.7)

    rec, _ = await asyncio.gather(
        stream_audio(f"{server.ws}/websocket/offer", "early", speech_48k(FIXTURE), 48000, tail_s=0.5),
        set_early(),
    )
    assert [g for _, g in seen] == [0.7], seen  # the second turn waits for an answer
    assert sum(1 for m in rec.messages if m.get("type") == "send_input") == 2


def trigger_stream(calls: list) -> Stream:
    def reply(audio):
        sr, samples = audio
        calls.append((sr, samples.shape))
        yield sr, np.zeros((1, 2400), np.int16)

    stream = Stream(ReplyOnPause(reply), modality="audio", concurrency_limit=2)

    @stream.post("/trigger/{webrtc_id}")
    async def trigger(webrtc_id: str) -> dict:
        stream.handlers[webrtc_id].trigger_response()  # FastRTC's demo pattern
        return {"status": "ok"}

    return stream


async def test_trigger_response_replies_without_a_pause(serve) -> None:
    calls: list = []
    server = serve(trigger_stream(calls))
    silence = np.zeros(48000 * 2, np.int16)  # never a turn of its own

    async def trigger_later() -> None:
        await asyncio.sleep(0.8)
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(f"{server.http}/trigger/quiet")
            assert r.status_code == 200, r.text

    rec, _ = await asyncio.gather(
        stream_audio(f"{server.ws}/websocket/offer", "quiet", silence, 48000, tail_s=1.0), trigger_later()
    )
    assert calls == [(48000, (1, 0))], calls  # no turn under way: empty audio
    logs = [m["data"] for m in rec.messages if m.get("type") == "log"]
    assert "pause_detected" in logs and "response_starting" in logs, logs
    assert rec.replies()


async def test_trigger_response_mid_utterance_gets_the_audio_so_far(serve) -> None:
    calls: list = []
    server = serve(trigger_stream(calls))
    pcm = speech_48k(FIXTURE)

    async with httpx.AsyncClient(timeout=10) as http:
        async def on_message(msg: dict) -> None:
            if msg.get("type") == "log" and msg.get("data") == "started_talking" and not calls:
                await asyncio.sleep(0.3)
                r = await http.post(f"{server.http}/trigger/mid")
                assert r.status_code == 200

        rec = await stream_audio(f"{server.ws}/websocket/offer", "mid", pcm, 48000, tail_s=2.5,
                                 on_message=on_message)
    assert calls, rec.messages
    sr, shape = calls[0]
    assert shape[0] == 1 and 0 < shape[1] < 3 * sr, calls  # part of the first utterance
    # the rest of the speech still makes turns of its own after the triggered one
    assert len(calls) >= 2, calls


def test_trigger_response_on_a_handler_without_a_connection_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="stream.handlers"):
        ReplyOnPause(lambda audio: None).trigger_response()
