"""Client docs for the three front ends: `GET /webrtc/docs`, `/websocket/docs`, `/telephone/docs`.

Each page says what a client sends and receives on that front end, with this stream's actual
settings (modality, mode, limits, the handler's sample rates), and ends with a complete
Python client in `<pre><code id="example">`. The clients are real modules
(`server/docs/examples/`): a page serves one's source with this stream's values in its
constants and the shared mu-law/WAV helpers inlined, so each is one script to copy; the tests
import the modules and run the code the pages serve against a real server, so the docs
cannot drift from the protocol. Pages are self-contained HTML: no scripts, no outside
stylesheets or fonts. They depend on the stream's configuration and its session count only.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from .. import twilio
from ..limits import MAX_MESSAGE_BYTES, START_TIMEOUT_S

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

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:62rem;margin:2rem auto;padding:0 1rem;line-height:1.45;color:#222}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
pre{background:#f5f5f5;border:1px solid #ddd;padding:.8rem;overflow-x:auto}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f0f0f0}nav a{margin-right:1rem}.note{background:#fff6d6;border:1px solid #e6c200;padding:.5rem}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A table; cells are trusted HTML (callers escape values with `_e`)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


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


def _facts(stream: StreamConfig, sessions: Sized, *, phone: bool = False) -> str:
    inp, out = stream.input_sample_rate, stream.output_sample_rate
    name = stream.handler_name
    audio = stream.modality in ("audio", "audio-video")
    rows: list[tuple[Any, ...]] = [
        ("handler", f"<code>{_e(name)}</code>"),
        ("modality", f"<code>{_e(stream.modality)}</code>"),
        ("mode", f"<code>{_e(stream.mode)}</code>"),
        ("concurrency_limit", f"{_e(stream.concurrency_limit)} connection(s) at once, all front ends "
                              "together (WebRTC, WebSocket and phone calls share it)"),
        ("time_limit", "none" if stream.time_limit is None else f"{_e(stream.time_limit)} s per connection"),
        ("active connections", _e(len(sessions))),
    ]
    if phone:
        rows.append(("audio in / out", "G.711 mu-law, 8000 Hz mono, both ways (the handler gets 8 kHz)"))
    elif audio:
        rows.append(("input_sample_rate", f"{inp} Hz (what the handler receives)"))
        rows.append(("output_sample_rate", f"{out} Hz (what the handler emits)"))
    if stream.can_interrupt is not None:
        rows.append(("ReplyOnPause can_interrupt", _e(stream.can_interrupt)))
    if stream.additional_inputs:
        rows.append(("additional inputs", f"{len(stream.additional_inputs)} (the server asks with "
                                          "<code>send_input</code>)"))
    if stream.additional_outputs:
        rows.append(("additional outputs", f"{len(stream.additional_outputs)} (announced with "
                                           "<code>fetch_output</code>)"))
    return _table(("setting", "value"), rows)


_CHANNEL_MESSAGES = [
    ("send_input", "data: []", "send the current values of the stream's additional inputs "
                               "(to the app's own route that calls <code>stream.set_input</code>)"),
    ("fetch_output", "data: [values...]", "the handler emitted <code>AdditionalOutputs</code>; the values"),
    ("log", "data: text", "progress: <code>started_talking</code>, <code>pause_detected</code>, "
                          "<code>response_starting</code> (ReplyOnPause)"),
    ("error", "<b>message</b>: text", "the handler raised or the input was bad (note: "
                                      "<code>message</code>, not <code>data</code>)"),
    ("warning", "<b>message</b>: text", "the handler raised <code>Warning</code>; the stream goes on"),
    ("end_stream", "data: reason", "the stream ends (time limit, or the handler emitted "
                                   "<code>CloseStream</code>)"),
    ("stopword", "data: ...", "a stop word was heard (handler-defined)"),
    ("update_connection", "data: {...}", "handler-defined connection update"),
]


def _channel_table() -> str:
    rows = [(f"<code>{t}</code>", f"<code>{d}</code>", what) for t, d, what in _CHANNEL_MESSAGES]
    return _table(("type", "payload", "meaning"), rows)


def _page(title: str, current: str, prefix: str, body: str) -> str:
    nav = "".join(
        f'<a href="{_e(prefix)}/{p}/docs"{" aria-current=page" if p == current else ""}>{p}</a>'
        for p in ("webrtc", "websocket", "telephone")
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<nav>{nav}</nav><h1>{_e(title)}</h1>{body}</body></html>"
    )


def _example(code: str) -> str:
    return f'<pre><code id="example">{_e(code)}</code></pre>'


def websocket_page(stream: StreamConfig, sessions: Sized, request: Request) -> str:
    http_base, ws_base, prefix = _base(request, "/websocket/docs")
    inp, out = stream.input_sample_rate, stream.output_sample_rate
    url = f"{ws_base}/websocket/offer"
    note = ""
    if stream.modality not in ("audio", "audio-video"):
        note = (f'<p class=note>This stream\'s modality is <code>{_e(stream.modality)}</code>: the '
                "WebSocket front end carries audio only, so use WebRTC for it.</p>")
    client_table = _table(("event", "fields", "notes"), [
        ("<code>start</code>", '<code>{"event": "start", "websocket_id": ID}</code>',
         "first, once; ID is a non-empty string you choose (unique among live connections). "
         f"Without it within {START_TIMEOUT_S:.0f} s the socket is closed."),
        ("<code>media</code>", '<code>{"event": "media", "media": {"payload": BASE64}}</code>',
         f"base64 of G.711 mu-law bytes, mono, <b>{inp} Hz</b> (the handler's input rate); 20 ms "
         f"({inp // 50} samples) per message is typical; send at real-time pace"),
        ("<code>ping</code>", '<code>{"event": "ping"}</code>', 'answered with <code>{"event": "pong"}</code>'),
        ("<code>stop</code>", '<code>{"event": "stop"}</code>', "ends the connection (the server closes with 1000)"),
    ])
    server_table = _table(("message", "notes"), [
        ('<code>{"event": "media", "media": {"payload": BASE64}}</code>',
         f"reply audio: mu-law, mono, <b>{out} Hz</b> (the handler's output rate), sent at about real time"),
        ('<code>{"event": "pong"}</code>', "answer to <code>ping</code>"),
        ('<code>{"type": TYPE, "data": ...}</code> / <code>{"type": "error", "message": ...}</code>',
         "data-channel messages, below"),
        ('<code>{"status": "failed", "meta": {"error": CODE, ...}}</code>',
         "refusal of <code>start</code>, then a close (1008)"),
    ])
    errors_table = _table(("code / message", "when"), [
        ('<code>concurrency_limit_reached</code> (with <code>"limit": N</code>)',
         f"already {stream.concurrency_limit} connection(s); then the socket closes with 1008"),
        ('<code>connection_already_exists</code> (with <code>"webrtc_id"</code>)', "the id is in use; close 1008"),
        ("<code>unknown_connection</code>, <code>invalid_candidate_format</code>, <code>invalid_sdp</code>",
         "WebRTC offer codes; not sent on this front end"),
        (_e('error "message is not valid JSON", "message must be a JSON object with an "event" field", '
            '"unknown event", "media payload is not valid base64", "media event needs {"media": {"payload": BASE64}}"'),
         "the message is ignored; the connection goes on"),
        (_e('error "send a "start" event before media"'), "close 1008"),
        (_e(f'error "message too large" (over {MAX_MESSAGE_BYTES} bytes)'), "close 1009"),
        ("error with the handler's exception", "the handler raised; the connection goes on"),
    ])
    body = f"""
<p>Audio over one WebSocket, FastRTC's protocol: <code>WS {_e(prefix)}/websocket/offer</code>
(<code>{_e(url)}</code>). Every frame is a JSON text frame.</p>{note}
<h2>This stream</h2>{_facts(stream, sessions)}
<h2>Client &rarr; server</h2>{client_table}
<h2>Server &rarr; client</h2>{server_table}
<h3>Data-channel messages</h3>{_channel_table()}
<h3>Refusals and errors</h3>{errors_table}
<p>Close codes: 1000 normal end (<code>stop</code>, time limit, <code>CloseStream</code>), 1008
protocol or policy (refused, no <code>start</code>, media before <code>start</code>), 1009 too large.</p>
<h2>Example</h2>
<p>Streams a WAV file (any rate; resampled to {inp} Hz) and saves the reply
(<code>python ws_client.py speech.wav {_e(url)}</code>):</p>
{_example(websocket_example(stream, url))}
"""
    return _page("WebSocket front end", "websocket", prefix, body)


def webrtc_page(stream: StreamConfig, sessions: Sized, request: Request) -> str:
    http_base, _, prefix = _base(request, "/webrtc/docs")
    inp, out = stream.input_sample_rate, stream.output_sample_rate
    media_rows: list[tuple[Any, ...]] = []
    if stream.modality in ("audio", "audio-video"):
        media_rows.append(("audio", f"Opus (48 kHz on the wire). The handler receives mono int16 "
                                    f"<code>(1, n)</code> arrays at <b>{inp} Hz</b> and emits audio at "
                                    f"<b>{out} Hz</b>, sent back as 20 ms frames."))
    if stream.modality in ("video", "audio-video"):
        media_rows.append(("video", "VP8 or H.264. The handler receives <code>(H, W, 3)</code> uint8 "
                                    "frames (BGR; RGB for batched handlers); only the freshest frame "
                                    "is processed, older ones are dropped, never queued."))
    directions = {
        "send-receive": "the client sends media and receives the processed media",
        "send": "the client sends media only",
        "receive": "the client receives media only (offer <code>recvonly</code> transceivers)",
    }[stream.mode]
    request_table = _table(("field", "type", "notes"), [
        ("<code>webrtc_id</code>", "string, required", "an id you choose for the connection (422 without it)"),
        ("<code>type</code>", "string",
         '<code>"offer"</code> starts a connection; <code>"ice-candidate"</code> adds a trickled candidate'),
        ("<code>sdp</code>", "string", "the offer SDP (for <code>offer</code>)"),
        ("<code>candidate</code>", "object",
         '<code>{"candidate": "candidate:...", "sdpMid": ..., "sdpMLineIndex": ...}</code> '
         "(for <code>ice-candidate</code>)"),
    ])
    response_table = _table(("response", "when"), [
        ('<code>{"sdp": ANSWER, "type": "answer"}</code>', "the offer is accepted"),
        ('<code>{"status": "success"}</code>', "the candidate was added"),
        ('<code>{"status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": N}}</code>',
         f"HTTP 200: already {stream.concurrency_limit} connection(s)"),
        ('<code>{"status": "failed", "meta": {"error": "connection_already_exists", "webrtc_id": ID}}</code>',
         "HTTP 200: the id is in use"),
        ('<code>{"status": "failed", "meta": {"error": "unknown_connection"}}</code>',
         "HTTP 200: an <code>ice-candidate</code> for an id with no connection"),
        ('<code>{"status": "failed", "meta": {"error": "invalid_candidate_format", "detail": ...}}</code>',
         "HTTP 400: the candidate could not be parsed"),
        ('<code>{"status": "failed", "meta": {"error": "invalid_sdp", "detail": ...}}</code>',
         "HTTP 400: no SDP, or an SDP that cannot be negotiated (nothing is left behind)"),
        ('<code>{"status": "failed", "meta": {"error": "invalid_type", "detail": ...}}</code>',
         'HTTP 400: <code>type</code> is neither <code>"offer"</code> nor <code>"ice-candidate"</code>'),
    ])
    media_table = _table(("track", "details"), media_rows) if media_rows else "<p>none</p>"
    body = f"""
<p>Media over WebRTC, FastRTC's offer protocol: <code>POST {_e(prefix)}/webrtc/offer</code>
(<code>{_e(http_base)}/webrtc/offer</code>). Mode <code>{_e(stream.mode)}</code>: {directions}.</p>
<h2>This stream</h2>{_facts(stream, sessions)}
<h2>Request</h2>{request_table}
<p>Create the data channel <b>before</b> the offer: the server's messages come on it.</p>
<h2>Responses</h2>{response_table}
<h2>Media</h2>{media_table}
<p>A connection that sends no media for 30 s is dropped.</p>
<h2>Data channel</h2>
<p>Server messages are JSON <code>{{"type": TYPE, "data": ...}}</code>, except <code>error</code>
and <code>warning</code>, which carry their text under <code>"message"</code>:</p>{_channel_table()}
<p>Anything the client sends on the channel is echoed back as a <code>log</code>
(<code>Server received: ...</code>); <code>{{"type": "set_input", "data": [values...]}}</code>
also sets the connection's additional inputs (this server's extension).</p>
<h2>Example</h2>
<p>aiortc + httpx, as a Python peer (<code>python webrtc_client.py speech.wav {_e(http_base)}</code>):</p>
{_example(webrtc_example(stream, http_base))}
"""
    return _page("WebRTC front end", "webrtc", prefix, body)


def telephone_page(stream: StreamConfig, sessions: Sized, request: Request) -> str:
    http_base, ws_base, prefix = _base(request, "/telephone/docs")
    host = request.headers.get("host") or "YOUR_HOST"
    local = twilio.host_name(host).lower() in twilio.LOCAL_HOSTS
    handler_url = f"{'ws' if request.url.scheme == 'http' and local else 'wss'}://{host}{prefix}/telephone/handler"
    note = ""
    if stream.modality != "audio":
        note = (f'<p class=note>This stream\'s modality is <code>{_e(stream.modality)}</code>: phone calls '
                "carry audio only, so <code>/telephone/incoming</code> answers HTTP 400 "
                '<code>{"status": "failed", "meta": {"error": "unsupported_modality"}}</code>.</p>')
    in_table = _table(("provider &rarr; server", "notes"), [
        ("<code>connected</code>", "ignored"),
        ("<code>start</code>", "<code>streamSid</code> (top level or in <code>start</code>) names the call: "
                               "required, unique among live connections"),
        ("<code>media</code>", "<code>media.payload</code>: base64 G.711 mu-law, <b>8000 Hz</b> mono "
                               "(20 ms = 160 bytes per message)"),
        ("<code>mark</code>, <code>dtmf</code>", "ignored"),
        ("<code>stop</code>", "the call ended; the server closes the socket"),
    ])
    out_table = _table(("server &rarr; provider", "notes"), [
        ('<code>{"event": "media", "streamSid": SID, "media": {"payload": BASE64}}</code>',
         "what the caller hears: mu-law, 8000 Hz, sent at about real time"),
        ('<code>{"event": "clear", "streamSid": SID}</code>',
         "the caller spoke over a reply (<code>ReplyOnPause(can_interrupt=True)</code>): drop buffered audio"),
        ('<code>{"type": TYPE, "data"/"message": ...}</code>',
         "FastRTC's data-channel messages (below); Twilio does not use them"),
        ('<code>{"status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": N}}</code>',
         f"a call over the limit ({stream.concurrency_limit}; phone calls count with every other "
         "connection); then close 1008"),
        ('<code>{"status": "failed", "meta": {"error": "connection_already_exists", ...}}</code>',
         "the <code>streamSid</code> is in use; close 1008"),
    ])
    body = f"""
<p>Phone calls through a telephony provider (Twilio Media Streams format). Point your number's
voice webhook ("A call comes in", HTTP POST) at <code>https://YOUR_HOST{_e(prefix)}/telephone/incoming</code>
(here: <code>{_e(http_base)}/telephone/incoming</code>). It answers TwiML that connects the call's
audio to <code>WS {_e(prefix)}/telephone/handler</code>. FastRTC's temporary numbers
(<code>stream.fastphone()</code>) need an outside service and are not offered.</p>{note}
<h2>This stream</h2>{_facts(stream, sessions, phone=True)}
<h2>Webhook: <code>POST {_e(prefix)}/telephone/incoming</code></h2>
<p>Any body (the provider's form fields are not needed). The answer, <code>application/xml</code>:</p>
<pre><code id="twiml">{_e(twilio.twiml(handler_url))}</code></pre>
<p>The stream URL uses this request's Host header and mount path; <code>wss://</code> unless the
request is plain http to localhost.</p>
<h2>Media stream: <code>WS {_e(prefix)}/telephone/handler</code></h2>
{in_table}{out_table}
<p>Bad input is answered like on <a href="{_e(prefix)}/websocket/docs">the WebSocket front end</a>: an
<code>error</code> message (not JSON, no <code>event</code>, bad base64; the call goes on), or an
<code>error</code> and a close (media before <code>start</code>: 1008; a message over
{MAX_MESSAGE_BYTES} bytes: 1009). <code>unknown_connection</code>, <code>invalid_candidate_format</code>
and <code>invalid_sdp</code> are WebRTC offer codes and do not occur here.</p>
<h3>Data-channel messages</h3>{_channel_table()}
<h3>A call, message by message</h3>
<pre><code id="sequence">{_e(telephone_messages())}</code></pre>
<h2>Example</h2>
<p>A simulated call: the webhook, then a WAV file as the caller's voice
(<code>python phone_call.py speech.wav {_e(http_base)}</code>):</p>
{_example(telephone_example(stream, http_base))}
"""
    return _page("Telephone front end", "telephone", prefix, body)


def router(sessions: Sized, config: StreamConfig) -> APIRouter:
    """The three docs pages of one stream (`sessions`: its registry, for the live count)."""
    r = APIRouter()

    async def webrtc_docs(request: Request) -> HTMLResponse:
        return HTMLResponse(webrtc_page(config, sessions, request))

    async def websocket_docs(request: Request) -> HTMLResponse:
        return HTMLResponse(websocket_page(config, sessions, request))

    async def telephone_docs(request: Request) -> HTMLResponse:
        return HTMLResponse(telephone_page(config, sessions, request))

    r.add_api_route("/webrtc/docs", webrtc_docs, methods=["GET"], response_class=HTMLResponse)
    r.add_api_route("/websocket/docs", websocket_docs, methods=["GET"], response_class=HTMLResponse)
    r.add_api_route("/telephone/docs", telephone_docs, methods=["GET"], response_class=HTMLResponse)
    return r
