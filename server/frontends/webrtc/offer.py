"""FastRTC's `POST /webrtc/offer`: check an offer, open its session, answer it.

An offer is checked before anything is allocated for it: its body is capped, its SDP must
parse and offer at least one media or data section, and (unless `allow_extra_tracks`) only
the kinds of media the stream's modality takes. `type: "ice-candidate"` adds a trickled
candidate to a connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription, candidate_from_sdp
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from ...ice_servers import aiortc_configuration, call_rtc_configuration
from ...limits import MAX_OFFER_BYTES
from ...registry import Refused
from ...request_body import read_json
from .connection import WebRTCChannel, WebRTCConnection
from .dtx import with_opus_dtx
from .ice import pin_ice_hosts

if TYPE_CHECKING:
    from ...config import StreamConfig
    from ...registry import SessionRegistry

logger = logging.getLogger(__name__)

MEDIA_KINDS = {"video": ("video",), "audio": ("audio",), "audio-video": ("audio", "video")}


class OfferBody(BaseModel):
    """FastRTC's offer body. `webrtc_id` is chosen by the client and is a bearer secret for
    the session: make it random (the `/ui` page gets one from the server)."""

    sdp: str | None = None
    type: str
    webrtc_id: str = Field(min_length=1, max_length=256)
    candidate: dict[str, Any] | None = None


OFFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": OfferBody.model_json_schema()}},
    }
}


def _failed(error: str, status: int = 200, **meta: Any) -> JSONResponse:
    return JSONResponse({"status": "failed", "meta": {"error": error, **meta}}, status_code=status)


async def server_ice_configuration(config: StreamConfig) -> RTCConfiguration:
    """The server's ICE configuration for one offer: `server_rtc_configuration`, or what it
    returns when it is a callable (sync or async), so time-limited TURN credentials are fresh
    for every connection (see `call_rtc_configuration`). One that has not answered in
    `ice_servers.RTC_CONFIG_TIMEOUT_S` fails the offer."""
    value = config.server_rtc_configuration
    if callable(value):
        value = await call_rtc_configuration(value)
    return aiortc_configuration(value)


def router(registry: SessionRegistry, config: StreamConfig) -> APIRouter:
    """`POST /webrtc/offer` for one stream."""
    pin_ice_hosts(config.settings.ice_hosts)
    serve_forwarded_candidates(registry)
    r = APIRouter()

    async def webrtc_offer(request: Request) -> JSONResponse:
        raw = await read_json(request, MAX_OFFER_BYTES)
        try:
            body = OfferBody.model_validate(raw)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        return await handle_offer(registry, config, body)

    r.add_api_route("/webrtc/offer", webrtc_offer, methods=["POST"], openapi_extra=OFFER_OPENAPI)
    return r


def check_offer_sdp(sdp: str, modality: str, allow_extra_tracks: bool) -> str | None:
    """What is wrong with an offer's SDP for this stream, or None. Cheap: nothing is
    allocated before this passes."""
    if "\x00" in sdp:
        return "the SDP contains NUL bytes"
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as e:  # aiortc's parser raises plain exceptions on garbage
        return f"the SDP does not parse: {type(e).__name__}: {e}"
    kinds = [m.kind for m in desc.media]
    if not kinds:
        return "the SDP offers no media and no data channel (no m= section)"
    unknown = [k for k in kinds if k not in ("audio", "video", "application")]
    if unknown:
        return f"the SDP offers unsupported media {unknown[0]!r}"
    if not allow_extra_tracks:
        for kind in kinds:
            if kind != "application" and kind not in MEDIA_KINDS[modality]:
                return f"Unsupported track kind '{kind}' for modality '{modality}'"
    return None


async def handle_offer(registry: SessionRegistry, config: StreamConfig, body: OfferBody) -> JSONResponse:
    if body.type == "ice-candidate":
        return await add_candidate(registry, body.webrtc_id, body.candidate)
    if body.type != "offer":
        return _failed("invalid_type", 400, detail=f"type must be 'offer' or 'ice-candidate', got {body.type!r}")
    if not body.sdp or not body.sdp.strip():
        return _failed("invalid_sdp", 400, detail="an offer needs a non-empty 'sdp'")
    problem = check_offer_sdp(body.sdp, config.modality, config.allow_extra_tracks)
    if problem is not None:
        error = "unsupported_track_kind" if problem.startswith("Unsupported track kind") else "invalid_sdp"
        return _failed(error, 400, detail=problem)
    return await negotiate(registry, config, body.webrtc_id, body.sdp)


async def negotiate(registry: SessionRegistry, config: StreamConfig, webrtc_id: str, sdp: str) -> JSONResponse:
    """Open a session for an offer that passed `check_offer_sdp` and answer it."""
    channel = WebRTCChannel(asyncio.get_running_loop())
    try:
        session = await registry.open_shared(webrtc_id, channel, kind="webrtc")
    except Refused as r:
        return JSONResponse(r.body())
    except Exception as e:  # the handler's copy() raised: not the client's fault
        logger.exception("could not open a session")
        return _failed("negotiation_failed", 500, detail=f"{type(e).__name__}: {e}")
    try:
        ice = await server_ice_configuration(config)
    except Exception as e:  # the app's callable (or what it returned): not the client's fault
        logger.exception("session %s: server_rtc_configuration failed", session.log_id)
        await session.close(f"server_rtc_configuration failed: {type(e).__name__}")
        return _failed("negotiation_failed", 500, detail=f"server_rtc_configuration: {type(e).__name__}: {e}")
    pc = RTCPeerConnection(ice)
    conn = WebRTCConnection(config, registry, session, pc, channel)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    except Exception as e:
        # A failed offer leaves nothing behind: no session, no peer connection, no slot.
        await session.close(f"bad offer: {type(e).__name__}")
        return _failed("invalid_sdp", 400, detail=f"could not negotiate the offer: {str(e) or type(e).__name__}")
    try:
        await conn.start()
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except Exception as e:  # not the SDP's fault: ours or the handler's
        logger.exception("session %s: negotiation failed", session.log_id)
        await session.close(f"negotiation failed: {type(e).__name__}")
        return _failed("negotiation_failed", 500, detail=f"{type(e).__name__}: {e}")
    sdp_out = pc.localDescription.sdp
    if config.modality in ("audio", "audio-video") and config.mode != "receive":
        sdp_out = with_opus_dtx(sdp_out)  # the client's silence costs ~5 packets/s, not 50
    return JSONResponse({"sdp": sdp_out, "type": pc.localDescription.type})


async def add_candidate(registry: SessionRegistry, webrtc_id: str, candidate: dict[str, Any] | None) -> JSONResponse:
    if registry.held_elsewhere(webrtc_id):
        # Another worker holds the peer connection: it adds the candidate there.
        assert registry.shared is not None
        try:
            status, body = await registry.shared.forward("ice", webrtc_id, candidate)
        except LookupError:
            return _failed("unknown_connection")
        return JSONResponse(body, status_code=status)
    return await _add_candidate_here(registry, webrtc_id, candidate)


def serve_forwarded_candidates(registry: SessionRegistry) -> None:
    """Let other workers add trickled candidates to the connections this worker holds."""

    async def ice(webrtc_id: str, candidate: Any) -> tuple[int, Any]:
        r = await _add_candidate_here(registry, webrtc_id, candidate if isinstance(candidate, dict) else None)
        return r.status_code, json.loads(r.body)

    registry.remote_ops["ice"] = ice


async def _add_candidate_here(registry: SessionRegistry, webrtc_id: str,
                              candidate: dict[str, Any] | None) -> JSONResponse:
    session = registry.get(webrtc_id)
    conn = getattr(session, "webrtc", None) if session else None
    if conn is None:
        return _failed("unknown_connection")
    cand = candidate or {}
    try:
        text = cand["candidate"]
        if not isinstance(text, str) or len(text) > 1024:
            raise ValueError("candidate must be a string of at most 1024 characters")
        ice = candidate_from_sdp(text.split(":", 1)[1] if text.startswith("candidate:") else text)
        ice.sdpMid = cand.get("sdpMid")
        ice.sdpMLineIndex = cand.get("sdpMLineIndex")
        await conn.pc.addIceCandidate(ice)
    except Exception as e:
        return _failed("invalid_candidate_format", 400, detail=str(e)[:200])
    return JSONResponse({"status": "success"})
