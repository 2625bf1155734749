"""Telephone front end: the Twilio-style voice webhook and media stream, and `fastphone`.

`POST /telephone/incoming` is what a telephony provider calls when the number rings (a Twilio
number's "A call comes in" webhook). It answers TwiML that greets the caller and connects the
call's audio to `WS /telephone/handler`, which speaks Twilio's Media Streams protocol
(`media_socket.py` in phone mode: 8 kHz mu-law both ways, `streamSid` on every message,
`clear` when a reply is interrupted). Phone calls are sessions like any other: they count
against the stream's `concurrency_limit`.

FastRTC's `stream.fastphone()` rents a temporary phone number from a Hugging Face service.
That needs an outside service this server does not use, so `fastphone` says so and how to
point a real number at `/telephone/incoming` instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from ..twilio import HANDLER_PATH, INCOMING_PATH, stream_url, twiml
from .media_socket import serve_media_socket

if TYPE_CHECKING:
    from ..config import StreamConfig
    from ..registry import SessionRegistry


def router(registry: SessionRegistry, config: StreamConfig) -> APIRouter:
    """`POST /telephone/incoming` and `WS /telephone/handler` for one stream."""
    r = APIRouter()

    async def telephone_incoming(request: Request) -> Response:
        if config.modality != "audio":
            return JSONResponse(
                {
                    "status": "failed",
                    "meta": {
                        "error": "unsupported_modality",
                        "modality": config.modality,
                        "detail": (
                            "phone calls carry audio only; this stream's modality is "
                            f"{config.modality!r}, not 'audio'"
                        ),
                    },
                },
                status_code=400,
            )
        url = stream_url(request, config.settings.public_url)
        return Response(content=twiml(url), media_type="application/xml")

    async def telephone_handler(websocket: WebSocket) -> None:
        await serve_media_socket(registry, websocket, phone_mode=True)

    r.add_api_route(INCOMING_PATH, telephone_incoming, methods=["POST"])
    r.add_api_websocket_route(HANDLER_PATH, telephone_handler)
    return r


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
