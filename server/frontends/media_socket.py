"""Audio over a WebSocket: FastRTC's `/websocket/offer` protocol and Twilio's Media Streams,
the one protocol engine both the WebSocket and the telephone front ends serve.

Client -> server JSON text frames by `event`: `start` (with `websocket_id`, or `streamSid` in
phone mode), `media` (base64 mu-law at the handler's input rate; 8 kHz on the phone), `stop`,
`ping` (-> `pong`), `mark`/`connected`/`dtmf` (phone, ignored). Server -> client: `media` at
the handler's output rate (8 kHz on the phone), paced at about real time, plus data-channel
messages (`{"type": ..., "data"/"message": ...}`). Bad input gets an `error` message; where
the session cannot go on (flooding, oversized frames, no `start`), a clean close with a
WebSocket close code that says why.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from ..codecs import ulaw_decode, ulaw_encode
from ..emit import pump_outputs
from ..handlers import DataChannel, StreamHandlerBase
from ..limits import (
    MAX_BYTES_BURST,
    MAX_BYTES_PER_S,
    MAX_MESSAGE_BURST,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGES_PER_S,
    MAX_SESSION_ID_CHARS,
    START_TIMEOUT_S,
)
from ..registry import Refused
from ..session import Session
from ..utils import RateLimitedLog, TokenBucket, call_on_loop, create_message, parse_json_message

if TYPE_CHECKING:
    from ..registry import SessionRegistry

logger = logging.getLogger(__name__)

SEND_QUEUE_SIZE = 256
PLAYOUT_LEAD_S = 0.1  # how far ahead of real time reply audio may be sent


class WebSocketChannel(DataChannel):
    """Data-channel messages and media share one ordered, bounded send queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log: RateLimitedLog) -> None:
        self.loop = loop
        self.log = log
        self.queue: asyncio.Queue[str | _Media | None] = asyncio.Queue(SEND_QUEUE_SIZE)
        # Bumped by `_clear` (a reply was interrupted): reply media queued or held under an
        # older generation is dropped, and the sink restarts its playout clock.
        self.generation = 0
        self.cleared = asyncio.Event()

    def send(self, message: str) -> None:  # any thread
        call_on_loop(self.loop, self._put, message)

    def _put(self, message: str) -> None:
        if self.queue.full():  # a reader this slow loses control messages, never memory
            self.log.warning("send_queue_full", "websocket send queue full; dropping a message")
            return
        self.queue.put_nowait(message)


class _Media:
    """Reply audio in the send queue, tagged with the clear generation it belongs to."""

    __slots__ = ("generation", "text")

    def __init__(self, generation: int, text: str) -> None:
        self.generation = generation
        self.text = text


class WebSocketAudioSink:
    """Reply audio as `media` messages, sent at most PLAYOUT_LEAD_S ahead of real time."""

    def __init__(self, session: Session, channel: WebSocketChannel, phone_mode: bool) -> None:
        self.session = session
        self.channel = channel
        self.phone_mode = phone_mode
        self.rate = 8000 if phone_mode else getattr(session.handler, "output_sample_rate", 24000)
        self.sends_audio = True
        self.play_end = time.monotonic()
        self.seen = channel.generation
        self._sid = json.dumps(session.webrtc_id)  # the phone's streamSid, as a JSON string

    def pending(self) -> bool:
        return False

    async def idle(self) -> None:
        return None

    async def write(self, pcm: np.ndarray) -> None:
        channel = self.channel
        generation = channel.generation
        now = time.monotonic()
        if generation != self.seen:  # a reply was interrupted: the client dropped its audio
            self.seen = generation
            channel.cleared.clear()
            self.play_end = now
        self.play_end = max(self.play_end, now)
        wait = self.play_end - PLAYOUT_LEAD_S - now
        if wait > 0:
            try:  # an interruption ends the wait: this chunk is then stale
                await asyncio.wait_for(channel.cleared.wait(), wait)
            except asyncio.TimeoutError:
                pass
        if channel.generation != generation:
            return  # interrupted while we held it: drop, never send after `clear`
        # Built as text: this runs for every 20 ms of reply audio, and base64 needs no JSON
        # escaping (json.dumps of the same dict costs 6x more).
        b64 = base64.b64encode(ulaw_encode(pcm)).decode("ascii")
        text = '{"event": "media", "media": {"payload": "' + b64 + '"}'
        text += f', "streamSid": {self._sid}}}' if self.phone_mode else "}"
        # Awaiting the bounded queue slows the handler to the client's pace.
        await channel.queue.put(_Media(generation, text))
        self.play_end += pcm.size / self.rate

    async def drain(self) -> None:
        await asyncio.sleep(max(0.0, self.play_end - time.monotonic()))


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


class _Connection:
    """One WebSocket: its send queue and writer, and the one way it is closed."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.log = RateLimitedLog(logger, "websocket")
        self.channel = WebSocketChannel(asyncio.get_running_loop(), self.log)
        self.writer = asyncio.create_task(_writer(ws, self.channel))
        self.code, self.reason = 1000, "bye"
        self.client_gone = False
        self.abusive = False
        self._finished = False

    def fatal(self, code: int, text: str, *, abusive: bool = False) -> None:
        """Tell the client why, then close with `code` (after the loop ends). An `abusive`
        client (a flood, an oversized frame) is not waited for: queued messages are dropped
        and its socket stops being read at once."""
        self.code, self.reason = code, text[:120]
        self.abusive = abusive
        if not abusive:
            self.channel.send(create_message("error", text))

    async def finish(self) -> None:
        """Flush queued messages (errors, end_stream), then close: once, from whichever
        side ends first (client, handler, time limit, server shutdown)."""
        if self._finished:
            return
        self._finished = True
        if self.abusive:
            await self._drop()
            return
        if not self.client_gone:
            try:
                self.channel.queue.put_nowait(None)
            except asyncio.QueueFull:
                pass
            # asyncio.wait, not wait_for: a writer cancelled meanwhile must not cancel us.
            await asyncio.wait({self.writer}, timeout=2.0)
        self.writer.cancel()
        ws = self.ws
        if (not self.client_gone and ws.application_state == WebSocketState.CONNECTED
                and ws.client_state == WebSocketState.CONNECTED):
            try:
                await ws.close(code=self.code, reason=self.reason)
            except Exception:  # the client went away meanwhile
                pass

    async def _drop(self) -> None:
        """Close an abusive client's socket now. A closing handshake would keep reading (and
        parsing, in Python) whatever the client still has in flight, megabytes of a flood,
        until its close reply arrives: the event loop of every session would pay for it."""
        self.writer.cancel()
        ws = self.ws
        try:
            if ws.application_state == WebSocketState.CONNECTED:
                await ws.send_text(create_message("error", self.reason))
                await ws.close(code=self.code, reason=self.reason)
        except Exception:
            pass
        # Starlette keeps the server's receive callable; uvicorn's protocols (websockets,
        # wsproto, sans-io) all hold their transport. Closing it flushes what we wrote and
        # stops reading. Elsewhere the graceful close above is all there is.
        transport = getattr(getattr(getattr(ws, "_receive", None), "__self__", None), "transport", None)
        if transport is not None and hasattr(transport, "close"):
            transport.close()


async def serve_media_socket(registry: SessionRegistry, ws: WebSocket, *, phone_mode: bool = False) -> None:
    """One WebSocket connection, from `accept` to close: `start` opens its session."""
    await ws.accept()
    conn = _Connection(ws)
    channel = conn.channel
    session: Session | None = None
    messages = TokenBucket(MAX_MESSAGES_PER_S, MAX_MESSAGE_BURST)
    volume = TokenBucket(MAX_BYTES_PER_S, MAX_BYTES_BURST)
    try:
        while True:
            if session is None:
                try:
                    raw = await asyncio.wait_for(ws.receive(), START_TIMEOUT_S)
                except asyncio.TimeoutError:
                    conn.fatal(1008, "no start event received in time")
                    break
            else:  # every media frame: no timer (the session has its own limits)
                raw = await ws.receive()
            if raw["type"] == "websocket.disconnect":
                conn.client_gone = True
                break
            text = raw.get("text")
            data = text if text is not None else (raw.get("bytes") or b"")
            if len(data) > MAX_MESSAGE_BYTES:
                conn.fatal(1009, f"message too large ({len(data)} bytes > {MAX_MESSAGE_BYTES})", abusive=True)
                break
            if not messages.take() or not volume.take(len(data)):
                conn.fatal(1008, f"too many messages: at most {MAX_MESSAGES_PER_S:g} a second", abusive=True)
                break
            if text is None:
                channel.send(create_message("error", "binary frames are not supported; send JSON text"))
                continue
            # Most messages are media in a plain form: their payload is read without a JSON parse.
            payload = _plain_media_payload(text) if session is not None else None
            if payload is not None:
                message, event = {}, "media"
            else:
                try:
                    message = parse_json_message(text, MAX_MESSAGE_BYTES)
                except ValueError as e:
                    channel.send(create_message("error", str(e)))
                    continue
                if not isinstance(message, dict) or "event" not in message:
                    channel.send(create_message("error", 'message must be a JSON object with an "event" field'))
                    continue
                event = message["event"]
            if event == "media":
                if session is None:
                    conn.fatal(1008, 'send a "start" event before media')
                    break
                audio = _decode_payload(payload) if payload is not None else _decode_media(message)
                if isinstance(audio, str):
                    channel.send(create_message("error", audio))
                    continue
                await _deliver_audio(session, audio, phone_mode)
            elif event == "start":
                if session is not None:
                    channel.send(create_message("error", "stream already started"))
                    continue
                session_id = _stream_id(message, phone_mode)
                if isinstance(session_id, ValueError):
                    conn.fatal(1008, str(session_id))
                    break
                try:
                    session = await registry.open_shared(session_id, channel, kind="telephone" if phone_mode else "websocket")
                except Refused as r:
                    channel.send(json.dumps(r.body()))
                    conn.code, conn.reason = 1008, "refused"
                    break
                except Exception as e:  # the handler's copy() raised
                    logger.exception("could not open a session")
                    conn.fatal(1011, f"could not start the session: {type(e).__name__}: {e}")
                    break
                session.on_close(conn.finish)
                conn.log = session.log
                channel.log = session.log
                _start_session(session, channel, phone_mode)
            elif event == "stop":
                break
            elif event == "ping":
                channel.send(json.dumps({"event": "pong"}))
            elif event in ("mark", "connected", "dtmf"):
                continue  # Twilio bookkeeping and key presses, sent unasked: nothing to do
            else:
                channel.send(create_message("error", f"unknown event {str(event)[:40]!r}"))
            if session is not None and not session.active:
                conn.reason = session.close_reason or "closed"
                break
    except WebSocketDisconnect:
        conn.client_gone = True
    finally:
        if conn.client_gone:
            conn.writer.cancel()
        if session is not None:
            session.close("client disconnected" if conn.client_gone else conn.reason)
        await conn.finish()
        if session is not None:
            await session.close()


def _stream_id(message: dict, phone_mode: bool) -> str | ValueError:
    if phone_mode:
        start = message.get("start")
        if start is not None and not isinstance(start, dict):
            return ValueError('"start" must be an object (Twilio: {"streamSid": ..., ...})')
        sid = message.get("streamSid") or (start or {}).get("streamSid")
        key = "streamSid"
    else:
        sid = message.get("websocket_id")
        key = "websocket_id"
    if not isinstance(sid, str) or not sid or len(sid) > MAX_SESSION_ID_CHARS:
        return ValueError(f'"start" needs a non-empty string "{key}" (at most {MAX_SESSION_ID_CHARS} characters)')
    return sid


if sys.version_info >= (3, 11):
    def _b64decode_strict(payload: str) -> bytes:
        """base64 with every character checked, in C (b64decode's `validate` runs a regex)."""
        return binascii.a2b_base64(payload, strict_mode=True)
else:  # Python 3.10: no strict mode in binascii
    def _b64decode_strict(payload: str) -> bytes:
        return base64.b64decode(payload, validate=True)


# A media message exactly as FastRTC's browser client (JSON.stringify) or Python's json.dumps
# writes it. Its payload is then a JSON string without escapes (no '"' or '\\' in it), so the
# text between the quotes is the string: taken without a JSON parse (~6 us per 20 ms frame on
# the event loop). Anything else (Twilio's extra fields, other spacing) is parsed as JSON.
_MEDIA_FORMS = ('{"event":"media","media":{"payload":"', '{"event": "media", "media": {"payload": "')
_MEDIA_END = '"}}'


def _plain_media_payload(text: str) -> str | None:
    """The payload of a media message in one of `_MEDIA_FORMS`, else None."""
    if not text.endswith(_MEDIA_END):
        return None
    for prefix in _MEDIA_FORMS:
        if text.startswith(prefix):
            payload = text[len(prefix): -len(_MEDIA_END)]
            if '"' in payload or "\\" in payload:
                return None
            return payload
    return None


def _decode_media(message: dict) -> np.ndarray | str:
    media = message.get("media")
    payload = media.get("payload") if isinstance(media, dict) else None
    if not isinstance(payload, str):
        return 'media event needs {"media": {"payload": BASE64}}'
    return _decode_payload(payload)


def _decode_payload(payload: str) -> np.ndarray | str:
    try:
        raw = _b64decode_strict(payload)
    except (binascii.Error, ValueError):
        return "media payload is not valid base64"
    return ulaw_decode(raw)


async def _deliver_audio(session: Session, pcm: np.ndarray, phone_mode: bool) -> None:
    handler = session.handler
    rate = 8000 if phone_mode else getattr(handler, "input_sample_rate", 48000)
    if pcm.size:
        frame = pcm.reshape(1, -1)
        if getattr(handler, "expected_layout", "mono") == "stereo":
            frame = np.repeat(frame, 2, axis=0)  # the wire is mono: both channels the same
        await session.receive((rate, frame))


def _start_session(session: Session, channel: WebSocketChannel, phone_mode: bool) -> None:
    handler = session.handler
    if isinstance(handler, StreamHandlerBase):
        handler.phone_mode = phone_mode
        handler._clear_queue = lambda: _clear(channel, phone_mode, session.webrtc_id)
    session.start_up()
    session.spawn(pump_outputs(session, WebSocketAudioSink(session, channel, phone_mode)), "emit")


def _clear(channel: WebSocketChannel, phone_mode: bool, sid: str) -> None:
    """The handler's `clear_queue()` (a reply was interrupted); callable from any thread.
    Queued and held reply audio is dropped; the phone client gets Twilio's `clear`."""

    def run() -> None:
        channel.generation += 1
        channel.cleared.set()
        if phone_mode:  # Twilio stops playing what it has buffered
            channel.send(json.dumps({"event": "clear", "streamSid": sid}))

    call_on_loop(channel.loop, run)
