"""Telephone front end: the Twilio-style voice webhook, and `Stream.fastphone`.

`POST /telephone/incoming` is what a telephony provider calls when the number rings (a Twilio
number's "A call comes in" webhook). It answers TwiML that greets the caller and connects the
call's audio to `WS /telephone/handler`, where `server/websocket.py` speaks Twilio's Media
Streams protocol (8 kHz mu-law both ways, `streamSid` on every message, `clear` when a reply
is interrupted). Phone calls are sessions like any other: they count against the stream's
`concurrency_limit`.

FastRTC's `stream.fastphone()` rents a temporary phone number from a Hugging Face service.
That needs an outside service this server does not use, so `fastphone` says so and how to
point a real number at `/telephone/incoming` instead.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape, quoteattr

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

INCOMING_PATH = "/telephone/incoming"
HANDLER_PATH = "/telephone/handler"
GREETING = "Connecting you to the assistant."
GOODBYE = "The call has been disconnected."
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _host_name(host: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def stream_url(request: Request, public_url: str | None = None) -> str:
    """The `wss://HOST/PATH/telephone/handler` URL for the call, from the webhook request.

    With `public_url` (`BATCHRTC_PUBLIC_URL`, e.g. `https://voice.example.com`) HOST comes
    from it: the call's audio always goes where the operator says. Without it, HOST is the
    request's Host header (a proxy in front, such as ngrok, passes the public host) -- which
    whoever calls the webhook controls, so set `BATCHRTC_PUBLIC_URL` in production. PATH is
    the prefix the stream's routes are mounted under. Plain `ws://` only for a plain-http
    request to this machine itself (local testing) or an http `public_url`."""
    path = request.url.path
    prefix = path[: -len(INCOMING_PATH)] if path.endswith(INCOMING_PATH) else ""
    prefix = prefix.rstrip("/")
    if public_url:
        parts = urlsplit(public_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{prefix}{HANDLER_PATH}"
    host = request.headers.get("host") or (request.url.netloc or "localhost")
    local = _host_name(host).lower() in LOCAL_HOSTS
    scheme = "ws" if request.url.scheme == "http" and local else "wss"
    return f"{scheme}://{host}{prefix}{HANDLER_PATH}"


def twiml(url: str, greeting: str = GREETING, goodbye: str = GOODBYE) -> str:
    """TwiML: say a greeting, stream the call's audio to `url`, say goodbye when it ends."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        "<Response>"
        f"<Say>{escape(greeting)}</Say>"
        f"<Connect><Stream url={quoteattr(url)}/></Connect>"
        f"<Say>{escape(goodbye)}</Say>"
        "</Response>"
    )


def add_routes(router: APIRouter, stream: Any) -> None:
    """Add `POST /telephone/incoming` (the `WS /telephone/handler` route is the stream's)."""

    async def telephone_incoming(request: Request) -> Response:
        if stream.modality != "audio":
            return JSONResponse(
                {
                    "status": "failed",
                    "meta": {
                        "error": "unsupported_modality",
                        "modality": stream.modality,
                        "detail": (
                            "phone calls carry audio only; this stream's modality is "
                            f"{stream.modality!r}, not 'audio'"
                        ),
                    },
                },
                status_code=400,
            )
        url = stream_url(request, stream.settings.public_url)
        return Response(content=twiml(url), media_type="application/xml")

    router.add_api_route(INCOMING_PATH, telephone_incoming, methods=["POST"])


def fastphone(
    stream: Any,
    token: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    **kwargs: Any,
) -> None:
    """FastRTC's temporary phone number: not offered here (bind as `Stream.fastphone`).

    FastRTC asks a Hugging Face service for a temporary number that forwards calls to this
    machine. That service is outside this server and is never contacted: this raises at once
    with what to do instead."""
    raise RuntimeError(
        "fastphone() is not available: the temporary phone-number service FastRTC uses is an "
        "outside (Hugging Face) service that this server does not offer and cannot reach. "
        "Use a real telephony provider instead: serve this stream over HTTPS (for example "
        f"`uvicorn app:stream --host {host} --port {port}` behind a TLS proxy or tunnel), then "
        "set your phone number's voice webhook (for a Twilio number: 'A call comes in' -> "
        "Webhook, HTTP POST) to https://YOUR_HOST/telephone/incoming. It answers with TwiML "
        "that connects the call to wss://YOUR_HOST/telephone/handler (8 kHz mu-law, Twilio "
        "Media Streams format). Add the mount path if the stream is mounted under one, e.g. "
        "https://YOUR_HOST/rtc/telephone/incoming."
    )
