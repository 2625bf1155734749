"""`Stream`: a FastAPI app that serves one handler over FastRTC's front ends.

`Stream(handler, ...)` *is* a FastAPI app (`uvicorn app:stream`, `@stream.get("/")`), and
`stream.mount(app, path)` adds its routes to another app, as FastRTC 0.0.34 does. Every
connection gets its own `handler.copy()`; model work is shared through the batchers.

The stream owns: the session registry (ids, `concurrency_limit`), the handler threads, the
batched handler's worker, the `/ui`; its lifespan starts and stops them, whether it is served
itself or mounted onto another app.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, WebSocket

from .config import Settings, load_settings
from .handler_pool import HandlerPool
from .handlers import DataChannel, GeneratorSource, StreamHandlerBase, VideoStreamHandler
from .reply_on_pause import ReplyOnPause
from .registry import SessionRegistry
from .session import Session
from .utils import AdditionalOutputs, create_message
from .video import BatchedHandler

logger = logging.getLogger(__name__)
announce = logging.getLogger("uvicorn.error")  # printed by uvicorn's default log config

Modality = Literal["video", "audio", "audio-video"]
Mode = Literal["send-receive", "receive", "send"]


class UnknownConnection(HTTPException):
    """`set_input`/`output_stream` for an id that is not connected: a clear 404."""

    def __init__(self, webrtc_id: str) -> None:
        super().__init__(404, detail="unknown connection")
        self.webrtc_id = webrtc_id


class Stream(FastAPI):
    def __init__(
        self,
        handler: Any,
        *,
        additional_outputs_handler: Callable[..., Any] | None = None,
        mode: Mode = "send-receive",
        modality: Modality = "video",
        concurrency_limit: int | None | Literal["default"] = "default",
        time_limit: float | None = None,
        allow_extra_tracks: bool = False,
        rtp_params: dict[str, Any] | None = None,
        rtc_configuration: dict[str, Any] | Callable[..., Any] | None = None,
        server_rtc_configuration: dict[str, Any] | None = None,
        track_constraints: dict[str, Any] | None = None,
        additional_inputs: list[Any] | None = None,
        additional_outputs: list[Any] | None = None,
        ui_args: dict[str, Any] | None = None,
        verbose: bool = True,
        handler_timeout: float | None = 30.0,
        **fastapi_kwargs: Any,
    ) -> None:
        if modality not in ("video", "audio", "audio-video"):
            raise ValueError(f"modality must be 'video', 'audio' or 'audio-video', got {modality!r}")
        if mode not in ("send-receive", "receive", "send"):
            raise ValueError(f"mode must be 'send-receive', 'receive' or 'send', got {mode!r}")
        if additional_outputs and additional_outputs_handler is None:
            raise ValueError(
                "additional_outputs_handler must be provided if there are additional_outputs."
            )
        if concurrency_limit in ("default", None):
            limit = 1  # FastRTC's default: one connection
        elif isinstance(concurrency_limit, int) and not isinstance(concurrency_limit, bool) and concurrency_limit >= 1:
            limit = concurrency_limit
        else:
            raise ValueError(f"concurrency_limit must be a positive int, 'default' or None, got {concurrency_limit!r}")
        if time_limit is not None and time_limit <= 0:
            raise ValueError(f"time_limit must be positive seconds, got {time_limit!r}")
        if handler_timeout is not None and handler_timeout <= 0:
            raise ValueError(f"handler_timeout must be positive seconds or None, got {handler_timeout!r}")
        fastapi_kwargs.setdefault("title", "batchrtc stream")
        fastapi_kwargs.setdefault("lifespan", self._lifespan)
        super().__init__(**fastapi_kwargs)
        self.handler = handler
        self.mode = mode
        self.modality = modality
        self.concurrency_limit = limit
        self.time_limit = time_limit
        self.allow_extra_tracks = allow_extra_tracks
        self.rtp_params = rtp_params
        self.rtc_configuration = rtc_configuration
        self.server_rtc_configuration = server_rtc_configuration
        self.track_constraints = track_constraints
        self.additional_inputs = list(additional_inputs or [])
        self.additional_outputs = list(additional_outputs or [])
        self.additional_outputs_handler = additional_outputs_handler
        self.ui_args = ui_args or {}
        self.verbose = verbose
        # Per-call limit for handler calls that should return promptly (receive, per-frame
        # video); a call that outlives it ends its session. `emit` may wait: no limit there.
        self.handler_timeout = handler_timeout
        self.settings: Settings = load_settings()
        self.pool = HandlerPool(self.settings.handler_threads, self.settings.handler_threads_lost)
        self.registry = SessionRegistry(limit, capacity_check=self._capacity_problem)
        self.default_args = [getattr(c, "value", None) for c in self.additional_inputs]
        if isinstance(handler, ReplyOnPause):
            handler.default_args = list(self.default_args)
        self.rtc_router = self._build_router()
        self.include_router(self.rtc_router)
        from .ui import attach_ui

        attach_ui(self)

    # -- routes ------------------------------------------------------------------------------
    def _build_router(self) -> APIRouter:
        router = APIRouter()
        from .websocket import handle_websocket

        async def websocket_offer(websocket: WebSocket) -> None:
            await handle_websocket(self, websocket)

        async def telephone_handler(websocket: WebSocket) -> None:
            await handle_websocket(self, websocket, phone_mode=True)

        from .webrtc import OFFER_OPENAPI, offer_endpoint

        router.add_api_route("/webrtc/offer", offer_endpoint(self), methods=["POST"], openapi_extra=OFFER_OPENAPI)
        router.add_api_websocket_route("/websocket/offer", websocket_offer)
        router.add_api_websocket_route("/telephone/handler", telephone_handler)
        # Each module adds its own routes (kept out of this file so each can be read alone).
        from . import docs, metrics, telephone

        telephone.add_routes(router, self)
        docs.add_routes(router, self)
        metrics.add_routes(router, self)
        return router

    def mount(self, app: FastAPI, path: str = "", tags: list[str | Any] | None = None) -> None:
        """Add this stream's routes (and its `/ui`) to another FastAPI app under `path`,
        FastRTC's way; `tags` label them in the OpenAPI schema. The app's lifespan then also
        runs this stream's (workers started, sessions closed at shutdown, `/ui` closed)."""
        prefix = path.rstrip("/")
        app.include_router(self.rtc_router, prefix=prefix, tags=tags)
        ui = getattr(self, "ui_app", None)
        if ui is not None:
            app.mount(f"{prefix}/ui", ui)
        outer = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            async with outer(a) as state, self._lifespan(a):
                yield state

        app.router.lifespan_context = lifespan

    def fastphone(self, *args: Any, **kwargs: Any) -> None:
        """FastRTC's temporary phone number needs an outside service: this explains how to
        point a telephony provider at `/telephone/incoming` instead (always raises)."""
        from .telephone import fastphone

        fastphone(self, *args, **kwargs)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        batched = self.handler if isinstance(self.handler, BatchedHandler) else None
        if batched is not None:
            batched.start()  # load the model (in its process) before the first session
        if isinstance(self.handler, ReplyOnPause) and self.handler.model is None:
            from .vad_engine import get_vad_engine

            await asyncio.to_thread(get_vad_engine)  # the shared VAD, loaded off the loop
        if self.verbose:
            self._announce()
        try:
            yield
        finally:
            await self.registry.close_all("server shutdown")
            ui = getattr(self, "ui_app", None)
            if ui is not None:
                await ui.aclose()
            if batched is not None:
                await asyncio.to_thread(functools.partial(batched.close, restartable=True))

    def _announce(self) -> None:
        from .metrics import batcher_names, device_name

        title = self.ui_args.get("title") or f"{self.modality} stream"
        announce.info(
            "batchrtc: %s (%s, %s): open /ui on this server in a browser to try it "
            "(e.g. http://127.0.0.1:8000/ui); device %s; batchers: %s; at most %d sessions",
            title, self.modality, self.mode, device_name(self), ", ".join(batcher_names(self)) or "none",
            self.concurrency_limit,
        )

    # -- sessions ----------------------------------------------------------------------------
    @property
    def sessions(self) -> SessionRegistry:
        """Active sessions by id (read-only)."""
        return self.registry

    def _capacity_problem(self) -> str | None:
        if self.pool.exhausted:
            return (
                f"{self.pool.lost} handler threads are stuck in calls that timed out or whose "
                "session ended; new sessions are refused until they return (restart the server "
                "if they never do, and fix the handler that hangs)"
            )
        return None

    def open_session(self, webrtc_id: str, channel: DataChannel, *, kind: str) -> Session:
        """Register a connection, or raise `registry.Refused` with FastRTC's refusal. No await
        inside, so the limit check and the registration cannot interleave with another."""
        self.registry.admit(webrtc_id)
        handler = self.handler.copy() if hasattr(self.handler, "copy") else self.handler
        if isinstance(handler, VideoStreamHandler):
            pass  # a per-frame callable: shared, stateless
        elif self.mode == "receive" and self.modality == "audio" and not isinstance(handler, StreamHandlerBase):
            handler = GeneratorSource(handler, self.default_args)
        if isinstance(handler, ReplyOnPause) and not handler.default_args:
            handler.default_args = list(self.default_args)
        session = Session(self, webrtc_id, handler, channel, kind=kind, pool=self.pool)
        self.registry.add(session)
        if self.time_limit is not None:
            session.spawn(self._enforce_time_limit(session), "time_limit")
        if self.verbose:
            logger.info("session %s (%s) opened; %d active", session.log_id, kind, len(self.registry))
        return session

    async def _enforce_time_limit(self, session: Session) -> None:
        await asyncio.sleep(self.time_limit or 0)
        session.send(create_message("end_stream", "time limit reached"))
        session.close("time limit reached")

    async def close_all(self, reason: str) -> None:
        await self.registry.close_all(reason)

    def _session(self, webrtc_id: str) -> Session:
        session = self.registry.get(webrtc_id)
        if session is None or not session.active:
            raise UnknownConnection(webrtc_id)
        return session

    # -- additional inputs and outputs -------------------------------------------------------
    def set_input(self, webrtc_id: str, *args: Any) -> None:
        """Set the latest additional-input values of one connection.

        Audio handlers see `latest_args == ["__webrtc_value__", *args]` (FastRTC's layout);
        per-frame video handlers get `args` after the frame. Unknown id: `UnknownConnection`
        (an HTTP 404 when raised inside a route). The id is the only credential: whoever
        knows a session's `webrtc_id` may set its inputs (FastRTC's model)."""
        session = self._session(webrtc_id)
        handler = session.handler
        if isinstance(handler, StreamHandlerBase):
            handler.set_args(["__webrtc_value__", *args])
        session.latest_args = list(args)

    def output_stream(self, webrtc_id: str) -> AsyncIterator[AdditionalOutputs]:
        """One connection's `AdditionalOutputs` as they come, until it ends. Every reader
        gets every output (at most 8 readers per session); every reader ends with it.

        The id is checked when this is called (not at the first iteration), so a route that
        calls it before building its `StreamingResponse` answers an unknown id with a 404."""
        return self._session(webrtc_id).output_stream()

    # -- telephone / UI parity -------------------------------------------------------------
    @property
    def active_sessions(self) -> int:
        return len(self.registry)
