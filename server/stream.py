"""`Stream`: a FastAPI app that serves one handler over FastRTC's front ends.

`Stream(handler, ...)` *is* a FastAPI app (`uvicorn app:stream`, `@stream.get("/")`), and
`stream.mount(app, path)` adds its routes to another app, as FastRTC 0.0.34 does.

It is the composition root and nothing more: it validates its arguments into a frozen
`StreamConfig`, builds the session registry (every connection gets its own `handler.copy()`
there), the handler threads and the engine registry, hands the registry and the config to
each front end's router, the `/ui`, the docs pages and `/metrics`, and owns one lifespan
that starts and stops all of it, whether it is served itself or mounted onto another app.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, FastAPI

from . import docs, metrics
from .config import Modality, Mode, StreamConfig, UIArgs, load_settings, uvicorn_deflate_left_on
from .engine.client import private_dir
from .engine.ui_host import UIProxy, UISocketServer
from .engines import EngineRegistry
from .frontends import telephone, webrtc, websocket
from .handler_pool import HandlerPool
from .handlers import DataChannel, GeneratorSource, StreamHandlerBase, VideoStreamHandler
from .registry import HandlerView, SessionRegistry, UnknownConnection
from .reply_on_pause import ReplyOnPause
from .session import Session
from .ui import UI_PATH, LazyGradioUI, PageBackend
from .utils import AdditionalOutputs

logger = logging.getLogger(__name__)
announce = logging.getLogger("uvicorn.error")  # printed by uvicorn's default log config

__all__ = ["Modality", "Mode", "Stream", "UnknownConnection"]


def freeze_startup_objects() -> None:
    """Move every object built so far (torch, FastAPI, Gradio, the app: ~230k objects) out of
    the cyclic GC's reach: they live as long as the server. A full collection otherwise walks
    all of them, ~130 ms with the event loop stopped while every session's audio waits (one
    per ~13 s in a 200-session run). New objects are collected as before; frozen ones are
    still freed by reference counting. Garbage is collected first so none is frozen."""
    gc.collect()
    gc.freeze()


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
        server_rtc_configuration: dict[str, Any] | Callable[[], Any] | None = None,
        track_constraints: dict[str, Any] | None = None,
        additional_inputs: list[Any] | None = None,
        additional_outputs: list[Any] | None = None,
        ui_args: UIArgs | dict[str, Any] | None = None,
        verbose: bool = True,
        handler_timeout: float | None = 30.0,
        **fastapi_kwargs: Any,
    ) -> None:
        self.config = StreamConfig.build(
            handler,
            modality=modality,
            mode=mode,
            concurrency_limit=concurrency_limit,
            time_limit=time_limit,
            additional_inputs=additional_inputs,
            additional_outputs=additional_outputs,
            additional_outputs_handler=additional_outputs_handler,
            handler_timeout=handler_timeout,
            ui_args=ui_args,
            settings=load_settings(),
            allow_extra_tracks=allow_extra_tracks,
            rtp_params=rtp_params,
            rtc_configuration=rtc_configuration,
            server_rtc_configuration=server_rtc_configuration,
            track_constraints=track_constraints,
            verbose=verbose,
        )
        fastapi_kwargs.setdefault("title", "batchrtc stream")
        fastapi_kwargs.setdefault("lifespan", self._lifespan)
        super().__init__(**fastapi_kwargs)
        self.handler = handler
        if isinstance(handler, ReplyOnPause):
            handler.default_args = list(self.config.default_args)
        settings = self.config.settings
        self.pool = HandlerPool(settings.handler_threads, settings.handler_threads_lost)
        self.stream_metrics = metrics.StreamMetrics()
        self.engines = EngineRegistry(handler, uses_vad=isinstance(handler, ReplyOnPause) and handler.model is None,
                                      mode=settings.engine, settings=settings)
        self.registry = SessionRegistry(
            self.config.concurrency_limit,
            factory=self._new_session,
            capacity_check=self._capacity_problem,
            time_limit=self.config.time_limit,
            verbose=self.config.verbose,
        )
        self.ui_app = LazyGradioUI(
            PageBackend(
                registry=self.registry,
                config=self.config,
                offer=functools.partial(webrtc.negotiate, self.registry, self.config),
                candidate=functools.partial(webrtc.add_candidate, self.registry),
                check_offer=lambda sdp: webrtc.check_offer_sdp(sdp, self.config.modality, self.config.allow_extra_tracks),
                middleware=self.user_middleware,
            )
        )
        self.ui_app.launch_lifespan = self._lifespan  # `stream.ui.launch()` runs the stream too
        self._handlers = HandlerView(self.registry)
        self.rtc_router = self._build_router()
        self.include_router(self.rtc_router)
        # `Stream.mount` is FastRTC's (app, path) signature: mount through the router instead.
        self.router.mount(UI_PATH, app=self.ui_app, name="ui")
        self.add_middleware(UIProxy)  # passes /ui on to the worker serving it (engine mode only)

    # -- what the user passed (FastRTC's attribute names) -------------------------------------
    @property
    def modality(self) -> Modality:
        return self.config.modality

    @property
    def mode(self) -> Mode:
        return self.config.mode

    @property
    def concurrency_limit(self) -> int:
        return self.config.concurrency_limit

    @property
    def time_limit(self) -> float | None:
        return self.config.time_limit

    @property
    def allow_extra_tracks(self) -> bool:
        return self.config.allow_extra_tracks

    @property
    def rtc_configuration(self) -> Any:
        return self.config.rtc_configuration

    @property
    def server_rtc_configuration(self) -> Any:
        return self.config.server_rtc_configuration

    @property
    def track_constraints(self) -> Any:
        return self.config.track_constraints

    @property
    def additional_inputs(self) -> list[Any]:
        return list(self.config.additional_inputs)

    @property
    def additional_outputs(self) -> list[Any]:
        return list(self.config.additional_outputs)

    @property
    def additional_outputs_handler(self) -> Callable[..., Any] | None:
        return self.config.additional_outputs_handler

    @property
    def ui_args(self) -> dict[str, Any]:
        return dict(self.config.ui_args)

    @property
    def handler_timeout(self) -> float | None:
        return self.config.handler_timeout

    @property
    def settings(self) -> Any:
        return self.config.settings

    @property
    def default_args(self) -> list[Any]:
        return self.config.default_args

    # -- the Gradio UI (FastRTC's `stream.ui`) --------------------------------------------
    @property
    def ui(self) -> Any:
        """The `gradio.Blocks` that `/ui` serves: the generated page, built on first access
        (a second or two; `/ui` builds it on a worker thread, off the event loop). Extend it
        with `with stream.ui as demo: ...`, replace it with `stream.ui = blocks`, or serve it
        on its own with `stream.ui.launch()` (the stream's engines and sessions run there)."""
        return self.ui_app.blocks

    @ui.setter
    def ui(self, blocks: Any) -> None:
        self.ui_app.blocks = blocks

    @property
    def webrtc_component(self) -> Any:
        """FastRTC's `WebRTC` component in the generated page; here the (hidden) component
        whose value is the page's `webrtc_id`: as an event input it gives the connection's
        id, and `.handlers` maps ids to handlers (builds the page if it was not yet)."""
        return self.ui_app.default_ui().webrtc_component

    @property
    def handlers(self) -> HandlerView:
        """Each active connection's handler by `webrtc_id` (FastRTC's `Stream.handlers`),
        e.g. `stream.handlers[webrtc_id].trigger_response()`."""
        return self._handlers

    # -- routes ------------------------------------------------------------------------------
    def _build_router(self) -> APIRouter:
        router = APIRouter()
        for frontend in (webrtc, websocket, telephone):
            router.include_router(frontend.router(self.registry, self.config))
        router.include_router(docs.router(self.registry, self.config))
        metrics_router = metrics.router(
            metrics.MetricsSources(self.registry, self.config, self.engines, self.pool, self.stream_metrics)
        )
        self.metrics_registry = metrics_router.metrics_registry  # type: ignore[attr-defined]
        router.include_router(metrics_router)
        return router

    def mount(self, app: FastAPI, path: str = "", tags: list[str | Any] | None = None) -> None:
        """Add this stream's routes (and its `/ui`) to another FastAPI app under `path`,
        FastRTC's way; `tags` label them in the OpenAPI schema. The app's lifespan then also
        runs this stream's (workers started, sessions closed at shutdown, `/ui` closed)."""
        prefix = path.rstrip("/")
        app.include_router(self.rtc_router, prefix=prefix, tags=tags)
        app.mount(f"{prefix}{UI_PATH}", self.ui_app)
        outer = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            async with outer(a) as state, self._lifespan(a):
                yield state

        app.router.lifespan_context = lifespan

    def fastphone(self, *args: Any, **kwargs: Any) -> None:
        """FastRTC's temporary phone number needs an outside service: this explains how to
        point a telephony provider at `/telephone/incoming` instead (always raises)."""
        telephone.fastphone(self, *args, **kwargs)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        settings = self.config.settings
        await self.engines.start(shm_bytes=settings.engine_shm_mb << 20, hang_timeout_s=settings.engine_hang_s)
        self.registry.attach_engine(self.engines.shared_registry())
        ui_socket = None
        if self.engines.client is not None:  # /ui across workers: see server/engine/ui_host.py
            ui_socket = UISocketServer(self, os.path.join(private_dir(), f"ui-{os.getpid()}.sock"))
            await ui_socket.start()
            self.engines.client.announce_ui(ui_socket.path)
        if self.config.verbose:
            self._announce()
        if self.modality != "video" and uvicorn_deflate_left_on():
            announce.warning(
                "batchrtc: uvicorn negotiates WebSocket permessage-deflate (its default), so "
                "every audio frame over /websocket and /telephone is compressed; at 200 voice "
                "sessions that made replies seconds late. Start uvicorn with "
                "--ws-per-message-deflate false")
        freeze_startup_objects()
        try:
            yield
        finally:
            await self.registry.close_all("server shutdown")
            await self.ui_app.aclose()
            if ui_socket is not None:
                await ui_socket.stop()
            self.registry.attach_engine(None)
            await self.engines.stop()

    def _announce(self) -> None:
        title = self.config.ui_args.get("title") or f"{self.modality} stream"
        batchers = [
            f"{name} (max_batch_size {b.config.max_batch_size}, max_queue_delay_ms "
            f"{b.config.max_queue_delay_ms:g}, max_queue_size {b.config.max_queue_size})"
            for name, b in self.engines.batchers()
        ]
        announce.info(
            "batchrtc: %s (%s, %s): open /ui on this server in a browser to try it "
            "(e.g. http://127.0.0.1:8000/ui); device %s; batchers: %s; at most %d sessions",
            title, self.modality, self.mode, self.engines.device(), "; ".join(batchers) or "none",
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

    def _new_session(self, webrtc_id: str, channel: DataChannel, kind: str, registry: SessionRegistry) -> Session:
        """The registry's session factory: the handler's copy for this connection."""
        handler = self.handler.copy() if hasattr(self.handler, "copy") else self.handler
        if isinstance(handler, VideoStreamHandler):
            pass  # a per-frame callable: shared, stateless
        elif self.modality == "audio" and self.mode == "receive" and not isinstance(handler, StreamHandlerBase):
            handler = GeneratorSource(handler, self.config.default_args)
        if isinstance(handler, ReplyOnPause) and not handler.default_args:
            handler.default_args = list(self.config.default_args)
        return Session(
            registry, self.config, webrtc_id, handler, channel, kind=kind, pool=self.pool,
            metrics=self.stream_metrics,
        )

    def open_session(self, webrtc_id: str, channel: DataChannel, *, kind: str) -> Session:
        """Register a connection, or raise `registry.Refused` with FastRTC's refusal."""
        return self.registry.open(webrtc_id, channel, kind=kind)

    async def close_all(self, reason: str) -> None:
        await self.registry.close_all(reason)

    # -- additional inputs and outputs -------------------------------------------------------
    def set_input(self, webrtc_id: str, *args: Any) -> None:
        """Set the latest additional-input values of one connection.

        Audio handlers see `latest_args == ["__webrtc_value__", *args]` (FastRTC's layout);
        per-frame video handlers get `args` after the frame. Unknown id: `UnknownConnection`
        (an HTTP 404 when raised inside a route). The id is the only credential: whoever
        knows a session's `webrtc_id` may set its inputs (FastRTC's model)."""
        self.registry.set_input(webrtc_id, *args)

    def output_stream(self, webrtc_id: str) -> AsyncIterator[AdditionalOutputs]:
        """One connection's `AdditionalOutputs` as they come, until it ends. Every reader
        gets every output (at most 8 readers per session); every reader ends with it.

        The id is checked when this is called (not at the first iteration), so a route that
        calls it before building its `StreamingResponse` answers an unknown id with a 404."""
        return self.registry.output_stream(webrtc_id)

    # -- telephone / UI parity -------------------------------------------------------------
    @property
    def active_sessions(self) -> int:
        return len(self.registry)


def register_batcher(stream: Stream, batcher: Any) -> None:
    """Report a `DynamicBatcher` the app runs itself on `stream`'s `/metrics` and `/health`."""
    stream.engines.register_batcher(batcher)
