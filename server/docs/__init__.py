"""Client docs for the three front ends: `GET /webrtc/docs`, `/websocket/docs`, `/telephone/docs`.

Each page says what a client sends and receives on that front end, with this stream's actual
settings (modality, mode, limits, the handler's sample rates), and ends with a complete
Python client in `<pre><code id="example">`. The pages are Jinja templates
(`server/docs/templates/`, autoescaped). The clients are real modules
(`server/docs/examples/`): a page serves one's source with this stream's values in its
constants and the shared mu-law/WAV helpers inlined, so each is one script to copy; the tests
import the modules and run the code the pages serve against a real server, so the docs
cannot drift from the protocol. Pages are self-contained HTML: no scripts, no outside
stylesheets or fonts. They depend on the stream's configuration and its session count only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from .. import twilio
from ..limits import (
    MAX_CHANNEL_MESSAGE_BYTES,
    MAX_CHANNEL_MESSAGES_PER_S,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGES_PER_S,
    MAX_OFFER_BYTES,
    NO_MEDIA_TIMEOUT_S,
    START_TIMEOUT_S,
)

if TYPE_CHECKING:
    from ..config import StreamConfig

PHONE_RATE = 8000
EXAMPLES = Path(__file__).parent / "examples"
_INLINE = re.compile(r"^from \._audio import .*$", re.M)


# --- the examples --------------------------------------------------------------------------
def render_example(name: str, **values: Any) -> str:
    """The source of `examples/<name>.py` as one script: its `NAME = ...` constants set to
    `values` (strings as Python literals: a Host header cannot break out of them) and the
    shared helpers of `_audio.py` inlined where the module imports them."""
    source = (EXAMPLES / f"{name}.py").read_text(encoding="utf-8")
    helpers = (EXAMPLES / "_audio.py").read_text(encoding="utf-8")
    helpers = helpers[helpers.index("\ndef ") :].strip("\n")  # the functions, not the imports
    source = _INLINE.sub(lambda _: helpers, source)
    for key, value in values.items():
        literal = json.dumps(value) if isinstance(value, str) else repr(value)
        source, n = re.subn(rf"^{key} = [^#\n]*?(  #.*)?$", lambda m: f"{key} = {literal}{m.group(1) or ''}",
                            source, count=1, flags=re.M)
        if n != 1:
            raise ValueError(f"example {name!r} has no constant {key}")
    return source


def websocket_example(config: StreamConfig, url: str = "ws://127.0.0.1:8000/websocket/offer") -> str:
    """The WebSocket client example for this stream, connecting to `url` by default."""
    return render_example("websocket_client", URL=url, INPUT_RATE=config.input_sample_rate,
                          OUTPUT_RATE=config.output_sample_rate)


def webrtc_example(config: StreamConfig, base_url: str = "http://127.0.0.1:8000") -> str:
    """The aiortc + httpx client example for this stream (its modality and mode filled in)."""
    return render_example("webrtc_client", BASE_URL=base_url, MODALITY=config.modality, MODE=config.mode)


def telephone_example(config: StreamConfig, base_url: str = "http://127.0.0.1:8000") -> str:
    """The simulated Twilio call example for this stream."""
    return render_example("telephone_client", BASE_URL=base_url)


def telephone_messages(stream_sid: str = "MZ0123", call_sid: str = "CA0123") -> str:
    """The Twilio Media Streams message sequence of a call, one JSON message per line."""
    media_in = {"event": "media", "sequenceNumber": "2", "streamSid": stream_sid,
                "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "/////w=="}}
    rows = [
        ("provider -> server", {"event": "connected", "protocol": "Call", "version": "1.0.0"}),
        ("provider -> server", {"event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
                                "start": {"streamSid": stream_sid, "callSid": call_sid, "tracks": ["inbound"],
                                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                                          "channels": 1}}}),
        ("provider -> server", media_in),
        ("  ... one media message per 20 ms of the caller's audio ...", None),
        ("server -> provider", {"type": "log", "data": "started_talking"}),
        ("server -> provider", {"type": "log", "data": "pause_detected"}),
        ("server -> provider", {"type": "log", "data": "response_starting"}),
        ("server -> provider", {"event": "media", "streamSid": stream_sid, "media": {"payload": "BASE64 mu-law, 8 kHz"}}),
        ("  ... reply audio, sent at about real time ...", None),
        ("provider -> server", {"event": "mark", "sequenceNumber": "40", "streamSid": stream_sid,
                                "mark": {"name": "my-label"}}),
        ("server -> provider", {"event": "clear", "streamSid": stream_sid}),
        ("  (clear: the caller spoke over the reply; drop the reply audio not yet played)", None),
        ("provider -> server", {"event": "stop", "sequenceNumber": "99", "streamSid": stream_sid,
                                "stop": {"callSid": call_sid}}),
    ]
    lines = []
    for who, msg in rows:
        lines.append(who if msg is None else f"{who}: {json.dumps(msg)}")
    return "\n".join(lines)


# --- pages ---------------------------------------------------------------------------------
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _base(request: Request, suffix: str) -> tuple[str, str, str]:
    """(http base URL, ws base URL, prefix) of the stream's routes, from a docs request."""
    path = request.url.path
    prefix = path[: -len(suffix)] if path.endswith(suffix) else ""
    prefix = prefix.rstrip("/")
    host = request.headers.get("host") or request.url.netloc or "127.0.0.1:8000"
    secure = request.url.scheme in ("https", "wss")
    return (
        f"{'https' if secure else 'http'}://{host}{prefix}",
        f"{'wss' if secure else 'ws'}://{host}{prefix}",
        prefix,
    )


def _page(request: Request, name: str, title: str, current: str, prefix: str, **context: Any) -> HTMLResponse:
    """`templates/<name>`, autoescaped: values from a request (the Host header) stay text."""
    return TEMPLATES.TemplateResponse(
        request, name, {"title": title, "current": current, "prefix": prefix, **context}
    )


def websocket_page(stream: StreamConfig, sessions: Sized, request: Request) -> HTMLResponse:
    _, ws_base, prefix = _base(request, "/websocket/docs")
    url = f"{ws_base}/websocket/offer"
    return _page(request, "websocket.html", "WebSocket front end", "websocket", prefix,
                 stream=stream, active=len(sessions), url=url, example=websocket_example(stream, url),
                 start_timeout=f"{START_TIMEOUT_S:.0f}", max_bytes=MAX_MESSAGE_BYTES,
                 max_messages=f"{MAX_MESSAGES_PER_S:g}")


def webrtc_page(stream: StreamConfig, sessions: Sized, request: Request) -> HTMLResponse:
    http_base, _, prefix = _base(request, "/webrtc/docs")
    settings = stream.settings
    return _page(request, "webrtc.html", "WebRTC front end", "webrtc", prefix,
                 stream=stream, active=len(sessions), http_base=http_base,
                 example=webrtc_example(stream, http_base), max_offer_bytes=MAX_OFFER_BYTES,
                 max_pixels=settings.video_max_pixels, pixel_rate=settings.video_pixel_rate,
                 no_media_s=f"{NO_MEDIA_TIMEOUT_S:.0f}", channel_bytes=MAX_CHANNEL_MESSAGE_BYTES,
                 channel_rate=f"{MAX_CHANNEL_MESSAGES_PER_S:g}")


def telephone_page(stream: StreamConfig, sessions: Sized, request: Request) -> HTMLResponse:
    http_base, _, prefix = _base(request, "/telephone/docs")
    return _page(request, "telephone.html", "Telephone front end", "telephone", prefix,
                 stream=stream, active=len(sessions), http_base=http_base,
                 twiml=twilio.twiml(twilio.stream_url(request, stream.settings.public_url, prefix)),
                 public_url=stream.settings.public_url, max_bytes=MAX_MESSAGE_BYTES,
                 sequence=telephone_messages(), example=telephone_example(stream, http_base))


def router(sessions: Sized, config: StreamConfig) -> APIRouter:
    """The three docs pages of one stream (`sessions`: its registry, for the live count)."""
    r = APIRouter()

    async def webrtc_docs(request: Request) -> HTMLResponse:
        return webrtc_page(config, sessions, request)

    async def websocket_docs(request: Request) -> HTMLResponse:
        return websocket_page(config, sessions, request)

    async def telephone_docs(request: Request) -> HTMLResponse:
        return telephone_page(config, sessions, request)

    r.add_api_route("/webrtc/docs", webrtc_docs, methods=["GET"], response_class=HTMLResponse)
    r.add_api_route("/websocket/docs", websocket_docs, methods=["GET"], response_class=HTMLResponse)
    r.add_api_route("/telephone/docs", telephone_docs, methods=["GET"], response_class=HTMLResponse)
    return r
