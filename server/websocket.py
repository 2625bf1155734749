"""The WebSocket front end (FastRTC's `/websocket/offer` protocol; also Twilio-style phone).

Client -> server JSON text frames by `event`: `start` (with `websocket_id`, or `streamSid` in
phone mode), `media` (base64 mu-law at the handler's input rate; 8 kHz on the phone), `stop`,
`ping` (-> `pong`), `mark` (phone, ignored). Server -> client: `media` at the handler's output
rate (8 kHz on the phone), paced at about real time, plus data-channel messages
(`{"type": ..., "data"/"message": ...}`). Bad input gets an `error` message; where the
session cannot go on, a clean close with a WebSocket close code that says why.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from .audio_out import AudioOut
from .codecs import ulaw_decode, ulaw_encode
from .handlers import DataChannel, StreamHandlerBase
from .session import Session
from .utils import AdditionalOutputs, CloseStream, call_on_loop, create_message, split_output

if TYPE_CHECKING:
    from .stream import Stream

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20  # a 1 MiB text frame is ~8 s of 8 kHz audio; more is abuse
SEND_QUEUE_SIZE = 256
PLAYOUT_LEAD_S = 0.1  # how far ahead of real time reply audio may be sent
START_TIMEOUT_S = 30.0  # a socket that never sends `start` is dropped, as FastRTC drops media-less peers


class WebSocketChannel(DataChannel):
    """Data-channel messages and media share one ordered, bounded send queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str | _Media | None] = asyncio.Queue(SEND_QUEUE_SIZE)
        # Fix (phone interruption): bumped by `_clear`; reply media queued or held under an
        # older generation is dropped, and the emit loop restarts its playout clock.
        self.generation = 0
        self.cleared = asyncio.Event()

    def send(self, message: str) -> None:  # any thread
        call_on_loop(self.loop, self._put, message)

    def _put(self, message: str) -> None:
        if self.queue.full():  # a reader this slow loses control messages, never memory
            logger.warning("websocket send queue full; dropping a message")
            return
        self.queue.put_nowait(message)


class _Media:
    """Reply audio in the send queue, tagged with the clear generation it belongs to."""

    __slots__ = ("generation", "text")

    def __init__(self, generation: int, text: str) -> None:
        self.generation = generation
        self.text = text


async def _writer(ws: WebSocket, channel: WebSocketChannel) -> None:
    while True:
        msg = await channel.queue.get()
        if msg is None:
            return
        if isinstance(msg, _Media):
            if msg.generation != channel.generation:
                continue  # audio of an interrupted reply: never send it after the clear
            msg = msg.text
        await ws.send_text(msg)


def _failed(error: str, **meta: Any) -> str:
    return json.dumps({"status": "failed", "meta": {"error": error, **meta}})


async def handle_websocket(stream: Stream, ws: WebSocket, *, phone_mode: bool = False) -> None:
    await ws.accept()
    loop = asyncio.get_running_loop()
    channel = WebSocketChannel(loop)
    writer = asyncio.create_task(_writer(ws, channel))
    session: Session | None = None
    close_code, close_reason = 1000, "bye"
    closing = False

    async def finish(code: int, reason: str) -> None:
        """Flush queued messages (errors, end_stream), then close: once, from whichever
        side ends first (client, handler, time limit, server shutdown)."""
        nonlocal closing
        if closing:
            return
        closing = True
        try:
            channel.queue.put_nowait(None)
            await asyncio.wait_for(asyncio.shield(writer), 2.0)
        except (asyncio.QueueFull, asyncio.TimeoutError, Exception):
            pass
        writer.cancel()
        if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
            try:
                await ws.close(code=code, reason=reason[:120])
            except Exception:
                pass

    async def fatal(code: int, text: str) -> None:
        nonlocal close_code, close_reason
        channel.send(create_message("error", text))
        close_code, close_reason = code, text[:120]

    try:
        while True:
            timeout = START_TIMEOUT_S if session is None else None
            try:
                raw = await asyncio.wait_for(ws.receive(), timeout)
            except asyncio.TimeoutError:
                await fatal(1008, "no start event received in time")
                break
            if raw["type"] == "websocket.disconnect":
                close_code = -1
                break
            text = raw.get("text")
            if text is None:
                data = raw.get("bytes") or b""
                if len(data) > MAX_MESSAGE_BYTES:
                    await fatal(1009, f"message too large ({len(data)} bytes > {MAX_MESSAGE_BYTES})")
                    break
                channel.send(create_message("error", "binary frames are not supported; send JSON text"))
                continue
            if len(text) > MAX_MESSAGE_BYTES:
                await fatal(1009, f"message too large ({len(text)} bytes > {MAX_MESSAGE_BYTES})")
                break
            try:
                message = json.loads(text)
            except json.JSONDecodeError as e:
                channel.send(create_message("error", f"message is not valid JSON: {e.msg}"))
                continue
            if not isinstance(message, dict) or "event" not in message:
                channel.send(create_message("error", 'message must be a JSON object with an "event" field'))
                continue
            event = message["event"]
            if event == "media":
                if session is None:
                    await fatal(1008, 'send a "start" event before media')
                    break
                audio = _decode_media(message)
                if isinstance(audio, str):
                    channel.send(create_message("error", audio))
                    continue
                await _deliver_audio(session, audio, phone_mode)
            elif event == "start":
                if session is not None:
                    channel.send(create_message("error", "stream already started"))
                    continue
                session_id = _stream_id(message, phone_mode)
                if session_id is None:
                    key = "streamSid" if phone_mode else "websocket_id"
                    await fatal(1008, f'"start" needs a non-empty string "{key}"')
                    break
                session, refusal = stream._open_session(
                    session_id, channel, kind="telephone" if phone_mode else "websocket"
                )
                if session is None:
                    channel.send(refusal or _failed("unknown_error"))
                    close_code, close_reason = 1008, "refused"
                    break
                session.on_close(lambda s=session: finish(1000, s.close_reason or "closed"))
                _start_session(stream, session, ws, channel, phone_mode)
            elif event == "stop":
                break
            elif event == "ping":
                channel.send(json.dumps({"event": "pong"}))
            elif event in ("mark", "connected", "dtmf"):
                # Twilio bookkeeping. Fix: `dtmf` (a caller's key press, sent by Twilio
                # unasked) was answered with an "unknown event" error.
                continue
            else:
                channel.send(create_message("error", f"unknown event {str(event)[:40]!r}"))
            if session is not None and session.closed.is_set():
                close_reason = session.close_reason or "closed"
                break
    except WebSocketDisconnect:
        close_code = -1
    finally:
        if close_code == -1:
            closing = True  # the client is gone: nothing to flush or close
            writer.cancel()
        else:
            await finish(close_code, close_reason)
        if session is not None:
            await session.close(close_reason if close_code != -1 else "client disconnected")
        writer.cancel()


def _stream_id(message: dict, phone_mode: bool) -> str | None:
    if phone_mode:
        sid = message.get("streamSid") or (message.get("start") or {}).get("streamSid")
    else:
        sid = message.get("websocket_id")
    return sid if isinstance(sid, str) and sid else None


def _decode_media(message: dict) -> np.ndarray | str:
    media = message.get("media")
    payload = media.get("payload") if isinstance(media, dict) else None
    if not isinstance(payload, str):
        return 'media event needs {"media": {"payload": BASE64}}'
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return "media payload is not valid base64"
    return ulaw_decode(raw)


async def _deliver_audio(session: Session, pcm: np.ndarray, phone_mode: bool) -> None:
    handler = session.handler
    rate = 8000 if phone_mode else getattr(handler, "input_sample_rate", 48000)
    if pcm.size:
        await session.receive((rate, pcm.reshape(1, -1)))


def _start_session(
    stream: Stream, session: Session, ws: WebSocket, channel: WebSocketChannel, phone_mode: bool
) -> None:
    handler = session.handler
    if isinstance(handler, StreamHandlerBase):
        handler.phone_mode = phone_mode
        handler._clear_queue = lambda: _clear(channel, phone_mode, session.webrtc_id)
        start_up = getattr(handler, "start_up", None)
        if start_up is not None:
            session.spawn(session.call(start_up), "start_up")
    session.spawn(_emit_loop(session, channel, phone_mode), "emit")


def _clear(channel: WebSocketChannel, phone_mode: bool, sid: str) -> None:
    """The handler's `clear_queue()` (a reply was interrupted); callable from any thread.

    Fix: this used to only send Twilio's `clear`, while the emit loop still sent the reply
    chunk it held (after the `clear`, so the caller heard it) and kept the old reply's
    playout clock, delaying the new reply by what was left of the old one."""

    def run() -> None:
        channel.generation += 1
        channel.cleared.set()
        if phone_mode:  # Twilio stops playing what it has buffered
            channel.send(json.dumps({"event": "clear", "streamSid": sid}))

    call_on_loop(channel.loop, run)


async def _emit_loop(session: Session, channel: WebSocketChannel, phone_mode: bool) -> None:
    handler = session.handler
    target_rate = 8000 if phone_mode else getattr(handler, "output_sample_rate", 24000)
    out = AudioOut(target_rate)
    play_end = time.monotonic()
    seen = channel.generation
    while not session.closed.is_set():
        item = await session.next_output()
        generation = channel.generation
        if generation != seen:  # a reply was interrupted: the client dropped its audio
            seen = generation
            channel.cleared.clear()
            play_end = time.monotonic()
        frame, extra = split_output(item)
        if isinstance(extra, AdditionalOutputs):
            session.push_outputs(extra)
        if isinstance(frame, tuple) and len(frame) >= 2 and isinstance(frame[1], np.ndarray):
            pcm = out.convert(int(frame[0]), frame[1])
            if pcm.size:
                now = time.monotonic()
                play_end = max(play_end, now)
                wait = play_end - PLAYOUT_LEAD_S - now
                if wait > 0:
                    try:  # an interruption ends the wait: this chunk is then stale
                        await asyncio.wait_for(channel.cleared.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                if channel.generation != generation:
                    continue  # interrupted while we held it: drop, never send after `clear`
                payload: dict[str, Any] = {
                    "event": "media",
                    "media": {"payload": base64.b64encode(ulaw_encode(pcm)).decode("ascii")},
                }
                if phone_mode:
                    payload["streamSid"] = session.webrtc_id
                # Awaiting the bounded queue slows the handler to the client's pace.
                await channel.queue.put(_Media(generation, json.dumps(payload)))
                play_end += pcm.size / target_rate
        if isinstance(extra, CloseStream):
            await asyncio.sleep(max(0.0, play_end - time.monotonic()))
            session.send(create_message("end_stream", extra.msg))
            await session.close("handler closed the stream")
            return
