"""The WebSocket front end: FastRTC's `WS /websocket/offer` (mu-law audio in JSON messages)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, WebSocket

from .media_socket import serve_media_socket

if TYPE_CHECKING:
    from ..config import StreamConfig
    from ..registry import SessionRegistry


def router(registry: SessionRegistry, config: StreamConfig) -> APIRouter:
    r = APIRouter()

    async def websocket_offer(websocket: WebSocket) -> None:
        await serve_media_socket(registry, websocket)

    r.add_api_websocket_route("/websocket/offer", websocket_offer)
    return r
