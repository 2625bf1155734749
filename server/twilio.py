"""Twilio's side of a phone call: the TwiML a voice webhook answers and the media-stream URL
in it (shared by the telephone front end and its docs page)."""

from __future__ import annotations

from urllib.parse import urlsplit
from xml.sax.saxutils import escape, quoteattr

from fastapi import Request

INCOMING_PATH = "/telephone/incoming"
HANDLER_PATH = "/telephone/handler"
GREETING = "Connecting you to the assistant."
GOODBYE = "The call has been disconnected."
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def stream_url(request: Request, public_url: str | None = None, prefix: str | None = None) -> str:
    """The `wss://HOST/PATH/telephone/handler` URL for the call, from the webhook request.

    With `public_url` (`BATCHRTC_PUBLIC_URL`, e.g. `https://voice.example.com`) HOST comes
    from it: the call's audio always goes where the operator says. Without it, HOST is the
    request's Host header (a proxy in front, such as ngrok, passes the public host) -- which
    whoever calls the webhook controls, so set `BATCHRTC_PUBLIC_URL` in production. PATH is
    the prefix the stream's routes are mounted under (from the request's path unless given).
    Plain `ws://` only for a plain-http request to this machine itself (local testing) or an
    http `public_url`."""
    if prefix is None:  # from the webhook request's own path
        path = request.url.path
        prefix = path[: -len(INCOMING_PATH)] if path.endswith(INCOMING_PATH) else ""
    prefix = prefix.rstrip("/")
    if public_url:
        parts = urlsplit(public_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{prefix}{HANDLER_PATH}"
    host = request.headers.get("host") or (request.url.netloc or "localhost")
    local = host_name(host).lower() in LOCAL_HOSTS
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
