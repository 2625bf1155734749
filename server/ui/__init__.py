"""The Gradio `/ui`: an auto-generated page for any stream.

`LazyGradioUI(backend)` is a tiny ASGI app for `/ui`. Nothing Gradio is imported or built
until `Stream.ui` is read or the first request under `/ui` comes: then the Blocks are built
(for a request, in a worker thread, so live connections on the event loop keep flowing),
mounted with `gr.mount_gradio_app`, and Gradio's own lifespan (its queue) is started; every
later request goes straight to the Gradio app, exactly as if it had been mounted eagerly.
`Stream.ui = blocks` makes the next request mount those Blocks instead (FastRTC's
`stream.ui` setter); `blocks.launch()` is wrapped so its own server runs the stream too.

The page's media never goes through Gradio: a small WebRTC client (`static/panel.js`, inside
a `gr.HTML` panel) makes its offer through its own Gradio session (a server function), which
opens the connection like any other and binds its `webrtc_id` to that page. Python only sees
the connection's `webrtc_id` (kept in a hidden textbox): additional inputs are pushed with
`registry.set_input(webrtc_id, *values)` on every change (and once at connect, and whenever
the server asks with `send_input`); additional outputs come from
`registry.output_stream(webrtc_id)` through `additional_outputs_handler(*previous, *new)`,
FastRTC's merge semantics, in a Gradio generator event started at connect.

The UI depends on the session registry and the configuration only; how to make a WebRTC
connection is handed to it (`PageBackend`), so it imports no front end.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import inspect
import json
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..ice_servers import call_rtc_configuration

if TYPE_CHECKING:
    from fastapi.responses import JSONResponse

    from ..config import StreamConfig
    from ..registry import SessionRegistry

logger = logging.getLogger(__name__)

UI_PATH = "/ui"
# On Gradio 6 the page's panel is a `gr.HTML` with its own script and server functions
# (`html_template`, `js_on_load`, `server_functions`); on the 5 line (FastRTC's) the same
# script runs from the page's <head>, talking to Python through hidden textboxes (`_bridge`).
PAGE_MIN_GRADIO = 5


class UIUnavailable(RuntimeError):
    """The generated page cannot be built with the installed Gradio."""


def check_gradio_for_page() -> None:
    import gradio as gr

    major = int(gr.__version__.split(".")[0])
    if major < PAGE_MIN_GRADIO:
        raise UIUnavailable(
            f"batchrtc's generated /ui page needs gradio>={PAGE_MIN_GRADIO} (installed: "
            f"{gr.__version__}); serve your own Blocks with `stream.ui = blocks` instead."
        )


def gradio_major() -> int:
    import gradio as gr

    return int(gr.__version__.split(".")[0])
OUTPUT_MIN_INTERVAL_S = 0.1  # additional outputs reach the page at most ~10 times a second


STATIC = Path(__file__).parent / "static"


def _static(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class PageBackend:
    """What the `/ui` page needs of its stream."""

    registry: SessionRegistry
    config: StreamConfig
    # (webrtc_id, sdp) -> the offer's answer, as `POST /webrtc/offer` gives it
    offer: Callable[[str, str], Awaitable[JSONResponse]]
    # (webrtc_id, candidate) -> FastRTC's result for a trickled ICE candidate
    candidate: Callable[[str, dict[str, Any] | None], Awaitable[JSONResponse]]
    # sdp -> what is wrong with it for this stream, or None
    check_offer: Callable[[str], str | None]
    max_offer_bytes: int = 256 * 1024
    # Gradio checks its parent's middleware for a CORS policy: show it the stream's.
    middleware: list[Any] = field(default_factory=list)


class LazyGradioUI:
    """ASGI app at `/ui`: serves `blocks` (the default page, built on first use, or what the
    user set with `Stream.ui = ...`), mounting it on the first request after it changed."""

    def __init__(self, backend: PageBackend) -> None:
        self.backend = backend
        self.default: DefaultUI | None = None  # the generated page, once built
        self._user_blocks: Any = None  # `stream.ui = blocks`
        self.gradio_app: Any = None
        self._mounted: Any = None  # the Blocks `gradio_app` serves
        self.build_seconds: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._build_lock = threading.Lock()
        # Runs around `blocks.launch()`'s server (the stream's lifespan: engines, sessions).
        self.launch_lifespan: Callable[[Any], contextlib.AbstractAsyncContextManager[Any]] | None = None

    # -- the Blocks ------------------------------------------------------------------------
    def default_ui(self) -> DefaultUI:
        """The generated page, built now if it was not yet (blocking: a second or two)."""
        with self._build_lock:
            if self.default is None:
                check_gradio_for_page()
                t0 = time.perf_counter()
                self.default = build_blocks(self.backend)
                self.build_seconds = time.perf_counter() - t0
                self._wrap_launch(self.default.blocks)
                logger.info("built the Gradio /ui in %.2f s", self.build_seconds)
            return self.default

    @property
    def blocks(self) -> Any:
        """What `/ui` serves: the user's Blocks if set, else the default page (built now)."""
        user = self._user_blocks
        return user if user is not None else self.default_ui().blocks

    @blocks.setter
    def blocks(self, blocks: Any) -> None:
        import gradio as gr

        if not isinstance(blocks, gr.Blocks):
            raise TypeError(f"Stream.ui must be a gradio.Blocks, got {type(blocks).__name__}")
        self._wrap_launch(blocks)
        self._user_blocks = blocks  # the next request under /ui mounts it

    def _wrap_launch(self, blocks: Any) -> None:
        """`blocks.launch()` serves the page on its own Gradio server: the stream's lifespan
        (engines, sessions) must run there too (FastRTC wraps `launch` the same way)."""
        launch = blocks.launch
        if getattr(launch, "_batchrtc", False):
            return

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            app_kwargs = dict(kwargs.get("app_kwargs") or {})
            outer = app_kwargs.get("lifespan")
            ours = self.launch_lifespan

            @contextlib.asynccontextmanager
            async def lifespan(app: Any) -> Any:
                async with contextlib.AsyncExitStack() as stack:
                    state = await stack.enter_async_context(outer(app)) if outer is not None else None
                    if ours is not None:
                        await stack.enter_async_context(ours(app))
                    yield state

            app_kwargs["lifespan"] = lifespan
            kwargs["app_kwargs"] = app_kwargs
            return launch(*args, **kwargs)

        wrapped._batchrtc = True  # type: ignore[attr-defined]
        blocks.launch = wrapped

    # -- ASGI ------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        try:
            app = await self._ensure_started()
        except UIUnavailable as e:
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 501,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": str(e).encode()})
            return
        await app(scope, receive, send)

    def _current(self, loop: asyncio.AbstractEventLoop) -> bool:
        want = self._user_blocks if self._user_blocks is not None else (self.default and self.default.blocks)
        return self.gradio_app is not None and self._loop is loop and self._mounted is want

    async def _ensure_started(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._current(loop):
            return self.gradio_app
        if self._lock_loop is not loop:  # no await above: no other request interleaves here
            self._lock, self._lock_loop = asyncio.Lock(), loop
        assert self._lock is not None
        async with self._lock:
            if self._current(loop):
                return self.gradio_app
            # First request, new Blocks, or the stream served again on a new event loop.
            await self.aclose()
            self._stack = None  # a stack from a dead loop cannot be exited: drop it
            # Built and mounted in a worker thread: live connections on this loop keep flowing.
            holder, gradio_app, blocks = await loop.run_in_executor(None, self._mount)
            stack = contextlib.AsyncExitStack()
            # Gradio's lifespan: starts its queue on this loop (what mount_gradio_app's
            # wrapped lifespan does at startup; the stream's own startup ran long ago).
            await stack.enter_async_context(holder.router.lifespan_context(holder))
            self._stack = stack
            self.gradio_app, self._mounted, self._loop = gradio_app, blocks, loop
            return self.gradio_app

    def _mount(self) -> tuple[Any, Any, Any]:
        import gradio as gr
        from fastapi import FastAPI
        from starlette.routing import Mount

        blocks = self.blocks
        holder = FastAPI()
        # Gradio checks its parent's middleware for a CORS policy: show it the stream's.
        holder.user_middleware = self.backend.middleware
        gr.mount_gradio_app(holder, blocks, path=UI_PATH, **_mount_options(gr))
        mounted = [r for r in holder.routes if isinstance(r, Mount) and r.path == UI_PATH]
        return holder, mounted[-1].app, blocks

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None and self._loop is asyncio.get_running_loop():
            try:
                await stack.aclose()
            except Exception:  # shutting down anyway
                logger.debug("closing the Gradio /ui failed", exc_info=True)


def _mount_options(gr: Any) -> dict[str, Any]:
    """`mount_gradio_app` options this Gradio version knows (the 5 line lacks some)."""
    wanted = {
        "ssr_mode": False,
        "mcp_server": False,
        "run_history": False,
        "footer_links": ["gradio", "settings"],
        "theme": gr.themes.Default(),
    }
    params = inspect.signature(gr.mount_gradio_app).parameters
    return {k: v for k, v in wanted.items() if k in params}


# -- the page ------------------------------------------------------------------------------

DEFAULT_TITLES = {
    "video": "Video stream",
    "audio": "Audio stream",
    "audio-video": "Audio and video stream",
}


def _client_config(stream: StreamConfig) -> dict[str, Any]:
    rtc = stream.rtc_configuration
    tc = stream.track_constraints
    return {
        "modality": stream.modality,
        "mode": stream.mode,
        "video": stream.modality in ("video", "audio-video"),
        "audio": stream.modality in ("audio", "audio-video"),
        "mount_path": UI_PATH,
        "rtc_configuration": rtc if isinstance(rtc, dict) else None,
        "rtc_configuration_dynamic": callable(rtc),
        "track_constraints": tc if isinstance(tc, dict) else None,
    }


def _safe_text(text: Any) -> str:
    """Escaped for HTML and inert in Gradio's template engine (JS template + Handlebars)."""
    out = html.escape(str(text))
    for ch, ent in (("$", "&#36;"), ("{", "&#123;"), ("}", "&#125;"), ("`", "&#96;"), ("\\", "&#92;")):
        out = out.replace(ch, ent)
    return out


def _panel_html(stream: StreamConfig) -> str:
    cfg = _client_config(stream)
    sends = stream.mode in ("send-receive", "send")
    receives = stream.mode in ("send-receive", "receive")
    parts = [f'<div class="brtc" data-state="idle" data-modality="{stream.modality}" data-mode="{stream.mode}">']
    if cfg["video"]:
        parts.append('<div class="brtc-media">')
        if sends:
            parts.append(
                '<figure class="brtc-fig"><video class="brtc-local-video" autoplay muted playsinline></video>'
                "<figcaption>Camera</figcaption></figure>"
            )
        if receives:
            caption = "Processed" if sends else "Stream"
            parts.append(
                '<figure class="brtc-fig"><video class="brtc-remote-video" autoplay muted playsinline></video>'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        parts.append("</div>")
    if cfg["audio"]:
        parts.append('<div class="brtc-meters">')
        if sends:
            parts.append(
                '<div class="brtc-meter brtc-meter-mic"><span>Microphone</span>'
                '<div class="brtc-bar"><div class="brtc-fill"></div></div></div>'
            )
        if receives:
            parts.append(
                '<div class="brtc-meter brtc-meter-reply"><span>Reply</span>'
                '<div class="brtc-bar"><div class="brtc-fill"></div></div></div>'
            )
        parts.append("</div>")
        if receives:
            parts.append('<audio class="brtc-remote-audio" autoplay></audio>')
    parts.append(
        '<div class="brtc-controls"><button class="brtc-toggle" type="button">Start</button>'
        '<span class="brtc-dot"></span><span class="brtc-status">Idle</span></div>'
        '<ul class="brtc-log"></ul></div>'
    )
    return "".join(parts)


PANEL_CSS = _static("panel.css")

# The WebRTC client. Runs once per page load with `element` (the panel), `trigger` (fires a
# Gradio event on the panel with data) and `props` (our config under `props.rtc`).
PANEL_JS = _static("panel.js")


def _title_html(stream: StreamConfig) -> str | None:
    args = stream.ui_args or {}
    if args.get("hide_title"):
        return None
    title = _safe_text(args.get("title") or DEFAULT_TITLES.get(stream.modality, "Stream"))
    out = ['<div class="brtc-header">']
    icon = args.get("icon")
    if isinstance(icon, str) and icon:
        out.append(f'<img class="brtc-icon" src="{_safe_text(icon)}" alt="">')
    out.append(f"<h1>{title}</h1>")
    if args.get("subtitle"):
        out.append(f'<p class="brtc-subtitle">{_safe_text(args["subtitle"])}</p>')
    out.append("</div>")
    return "".join(out)


HEADER_CSS = _static("header.css")


def _component(gr: Any, obj: Any, index: int, kind: str, rendered: dict[int, Any]) -> Any:
    """A Gradio component for an additional input/output; placeholders for anything else
    (FastRTC allows plain objects with `.value`, e.g. in tests). A component that is both an
    input and an output (a transcript fed back in) is rendered once and serves as both."""
    if isinstance(obj, gr.components.Component):
        if id(obj) in rendered:
            return rendered[id(obj)]
        if kind == "output" and getattr(obj, "interactive", False) is None:
            obj.interactive = False  # shown, not edited (it is also an input of the updates)
        rendered[id(obj)] = obj.render()
        return rendered[id(obj)]
    if kind == "input":
        return gr.State(value=getattr(obj, "value", None))
    return gr.Textbox(value="", label=f"output {index}", interactive=False)


def _page_functions(backend: PageBackend, owners: dict[str, str], gr: Any) -> list[Any]:
    """Server functions the page calls through its own Gradio session (`server.ui_offer(...)`
    in panel.js): the connection is made and bound to that session (page) here."""
    registry = backend.registry

    async def page_of(request: Any) -> str | None:
        # Gradio hands server functions the raw request; its JSON body (already read and
        # cached by Gradio) names the page's session.
        sh = getattr(request, "session_hash", None)
        if not sh:
            try:
                body = await request.json()
            except Exception:
                return None
            sh = body.get("session_hash") if isinstance(body, dict) else None
        return sh if isinstance(sh, str) and sh else None

    async def owned(webrtc_id: str, request: Any) -> bool:
        owner = owners.get(webrtc_id)
        return bool(webrtc_id) and owner is not None and owner == await page_of(request)

    async def ui_offer(data: Any, request: gr.Request) -> dict[str, Any]:
        """The page's WebRTC offer, made through its own Gradio session: the server picks
        an unguessable `webrtc_id` and binds it to this page."""
        sdp = data.get("sdp") if isinstance(data, dict) else None
        if not isinstance(sdp, str) or not sdp.strip() or len(sdp) > backend.max_offer_bytes:
            return {"status": "failed", "meta": {"error": "invalid_sdp", "detail": "an offer needs an 'sdp' string"}}
        problem = backend.check_offer(sdp)
        if problem is not None:
            return {"status": "failed", "meta": {"error": "invalid_sdp", "detail": problem}}
        page = await page_of(request)
        if page is None:
            return {"status": "failed", "meta": {"error": "unknown_page", "detail": "no Gradio session"}}
        webrtc_id = secrets.token_urlsafe(18)
        owners[webrtc_id] = page
        response = await backend.offer(webrtc_id, sdp)
        body = json.loads(bytes(response.body))
        session = registry.get(webrtc_id)
        if session is None:
            owners.pop(webrtc_id, None)
            body["_status"] = response.status_code
            return body
        session.on_close(lambda: owners.pop(webrtc_id, None))
        return {**body, "webrtc_id": webrtc_id}

    async def ui_candidate(data: Any, request: gr.Request) -> dict[str, Any]:
        wid = data.get("webrtc_id") if isinstance(data, dict) else None
        if not isinstance(wid, str) or not await owned(wid, request):
            return {"status": "failed", "meta": {"error": "unknown_connection"}}
        response = await backend.candidate(wid, data.get("candidate"))
        return json.loads(bytes(response.body))

    async def ui_stop(data: Any, request: gr.Request) -> None:
        """The page stopped: end the session now (a closed peer connection alone can take
        the server a while to notice) so its concurrency slot is free at once."""
        wid = data.get("webrtc_id") if isinstance(data, dict) else None
        if isinstance(wid, str) and await owned(wid, request):
            session = registry.get(wid)
            if session is not None:
                await session.close("client stopped")

    for fn in (ui_offer, ui_candidate, ui_stop):
        fn.__annotations__["request"] = gr.Request
    return [ui_offer, ui_candidate, ui_stop]


@dataclass(frozen=True)
class DefaultUI:
    """The generated page: its Blocks, and the hidden textbox holding the page's
    `webrtc_id` (`Stream.webrtc_component`: as FastRTC's `WebRTC` component, an event input
    that gives the connection's id, with `.handlers`)."""

    blocks: Any
    webrtc_component: Any


def build_blocks(backend: PageBackend) -> DefaultUI:
    """Build the Gradio Blocks of `/ui` (on first use of `Stream.ui` or of `/ui`)."""
    import gradio as gr

    from ..registry import HandlerView, UnknownConnection

    stream, registry = backend.config, backend.registry

    args = stream.ui_args or {}
    title = str(args.get("title") or DEFAULT_TITLES.get(stream.modality, "Stream"))
    n_in = len(stream.additional_inputs)
    merge = stream.additional_outputs_handler
    has_side = bool(stream.additional_inputs or stream.additional_outputs)

    owners: dict[str, str] = {}  # webrtc_id -> the Gradio session (page) that made it
    server_functions = _page_functions(backend, owners, gr)
    if callable(stream.rtc_configuration):
        server_functions.append(_rtc_configuration_fn(stream))

    g6 = gradio_major() >= 6
    page_kwargs = {} if g6 else {"css": PANEL_CSS + HEADER_CSS, "head": _bridge_head(stream)}
    with gr.Blocks(title=title, analytics_enabled=False, **page_kwargs) as blocks:
        header = _title_html(stream)
        if header is not None:
            if g6:
                gr.HTML(value="", html_template=header, css_template=HEADER_CSS, js_on_load=None,
                        apply_default_css=False, elem_id="batchrtc-header")
            else:
                gr.HTML(value=header, elem_id="batchrtc-header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3 if has_side else 1):
                if g6:
                    panel = gr.HTML(
                        value="",
                        html_template=_panel_html(stream),
                        css_template=PANEL_CSS,
                        js_on_load=PANEL_JS,
                        apply_default_css=False,
                        padding=True,
                        container=True,
                        elem_id="batchrtc-panel",
                        server_functions=server_functions,
                        rtc=_client_config(stream),
                    )
                else:
                    panel = gr.HTML(value=_panel_html(stream), padding=True, container=True,
                                    elem_id="batchrtc-panel")
            inputs: list[Any] = []
            outputs: list[Any] = []
            if has_side:
                with gr.Column(scale=2):
                    rendered: dict[int, Any] = {}
                    inputs = [_component(gr, c, i, "input", rendered) for i, c in enumerate(stream.additional_inputs)]
                    outputs = [_component(gr, c, i, "output", rendered) for i, c in enumerate(stream.additional_outputs)]
        webrtc_box = gr.Textbox(value="", visible="hidden", label="webrtc_id", elem_id="batchrtc-webrtc-id")
        webrtc_box.handlers = HandlerView(registry)  # FastRTC: `stream.webrtc_component.handlers[id]`

        def event_id(evt: Any) -> str:
            data = getattr(evt, "_data", None)
            wid = data.get("webrtc_id") if isinstance(data, dict) else None
            return wid if isinstance(wid, str) else ""

        def owned(webrtc_id: str, request: Any) -> bool:
            """Only the page (Gradio session) that made a connection may drive it."""
            owner = owners.get(webrtc_id)
            return bool(webrtc_id) and owner is not None and owner == getattr(request, "session_hash", None)

        def push(webrtc_id: str, values: list[Any]) -> None:
            if not webrtc_id or not n_in:
                return
            try:
                registry.set_input(webrtc_id, *values)
            except UnknownConnection:
                pass  # stopped meanwhile

        async def push_inputs(request: gr.Request, webrtc_id: str, *values: Any) -> None:
            if owned(webrtc_id, request):
                push(webrtc_id, list(values))

        async def push_inputs_requested(evt, request: gr.Request, *values: Any) -> None:  # the server sent `send_input`
            if owned(event_id(evt), request):
                push(event_id(evt), list(values))

        async def push_inputs_requested_g5(event: str, request: gr.Request, *values: Any) -> None:
            wid = _bridge_id(event)
            if owned(wid, request):
                push(wid, list(values))

        def pack(first: Any, rest: list[Any]) -> Any:
            # Gradio: one output takes the value itself; several take a tuple.
            return first if not rest else (first, *rest)

        async def run_session(evt, request: gr.Request, *values: Any) -> Any:
            async for out in session_updates(event_id(evt), request, *values):
                yield out

        async def run_session_g5(event: str, request: gr.Request, *values: Any) -> Any:
            async for out in session_updates(_bridge_id(event), request, *values):
                yield out

        async def session_updates(webrtc_id: str, request: Any, *values: Any) -> Any:
            """From connect to the end of the connection: inputs once, then the outputs."""
            skip = [gr.update() for _ in outputs]
            if not owned(webrtc_id, request):
                return
            # Previous values: what the page shows (placeholders: the object's own `.value`).
            previous = [
                v if isinstance(c, gr.components.Component) else getattr(c, "value", None)
                for c, v in zip(stream.additional_outputs, values[n_in:])
            ]
            try:
                push(webrtc_id, list(values[:n_in]))
                stream_iter = registry.output_stream(webrtc_id)
            except UnknownConnection:
                yield pack("", skip)
                return
            yield pack(webrtc_id, skip)
            if not outputs or merge is None:
                # Nothing to show: leave the outputs to other readers; wait for the end.
                await stream_iter.aclose()
                session = registry.get(webrtc_id)
                if session is not None:
                    await session.closed.wait()
                yield pack("", skip)
                return
            it = stream_iter.__aiter__()
            nxt: asyncio.Future | None = None
            dirty = False
            last = 0.0
            try:
                while True:
                    if nxt is None:
                        nxt = asyncio.ensure_future(it.__anext__())
                    timeout = max(0.0, last + OUTPUT_MIN_INTERVAL_S - time.monotonic()) if dirty else None
                    done, _ = await asyncio.wait({nxt}, timeout=timeout)
                    if done:
                        fut, nxt = nxt, None
                        try:
                            item = fut.result()
                        except StopAsyncIteration:
                            break
                        try:
                            if inspect.iscoroutinefunction(merge):
                                new = await merge(*previous, *item.args)
                            else:  # user code stays off the event loop the media runs on
                                new = await asyncio.get_running_loop().run_in_executor(
                                    None, merge, *previous, *item.args
                                )
                                if inspect.isawaitable(new):
                                    new = await new
                        except Exception as e:
                            logger.exception("additional_outputs_handler raised")
                            gr.Warning(f"additional_outputs_handler raised {type(e).__name__}: {e}")
                            continue
                        previous = [new] if len(outputs) == 1 else list(new)
                        dirty = True
                        if time.monotonic() - last < OUTPUT_MIN_INTERVAL_S:
                            continue
                    if dirty:
                        dirty = False
                        last = time.monotonic()
                        yield pack(gr.update(), previous)
                if dirty:
                    yield pack(gr.update(), previous)
                yield pack("", skip)
            finally:
                if nxt is not None:
                    nxt.cancel()

        # Gradio injects EventData by annotation; set it explicitly (lazy gradio import).
        for fn in (push_inputs_requested, run_session):
            fn.__annotations__["evt"] = gr.EventData
        for fn in (push_inputs, push_inputs_requested, run_session, push_inputs_requested_g5, run_session_g5):
            fn.__annotations__["request"] = gr.Request

        private = {"api_visibility": "private"} if g6 else {"show_api": False, "api_name": False}
        common = dict(show_progress="hidden", concurrency_limit=None, **private)
        if g6:
            panel.play(run_session, inputs=[*inputs, *outputs], outputs=[webrtc_box, *outputs],
                       trigger_mode="multiple", **common)
            if inputs:
                panel.submit(push_inputs_requested, inputs=inputs, outputs=None, trigger_mode="multiple", **common)
        else:
            bridge = _bridge(gr, server_functions, common)
            bridge["play"].change(run_session_g5, inputs=[bridge["play"], *inputs, *outputs],
                                  outputs=[webrtc_box, *outputs], trigger_mode="multiple", **common)
            if inputs:
                bridge["submit"].change(push_inputs_requested_g5, inputs=[bridge["submit"], *inputs], outputs=None,
                                        trigger_mode="multiple", **common)
        if inputs:
            on_submit = args.get("send_input_on") == "submit"  # FastRTC's ui_args option
            for original, comp in zip(stream.additional_inputs, inputs):
                if not isinstance(original, gr.components.Component):
                    continue  # a placeholder: nothing on the page changes it
                listener = comp.submit if on_submit and hasattr(comp, "submit") else comp.change
                listener(push_inputs, inputs=[webrtc_box, *inputs], outputs=None,
                         trigger_mode="always_last", **common)
    return DefaultUI(blocks, webrtc_box)


# -- the Gradio 5 line: the panel's script in the page's <head>, Python through textboxes ----

BRIDGE_JS = _static("bridge.js")


def _bridge_head(stream: StreamConfig) -> str:
    """The panel's script, started by `bridge.js` once Gradio has rendered the panel."""
    # `</` cannot end the <script> early; the JSON text is otherwise JavaScript.
    cfg = json.dumps(_client_config(stream)).replace("</", "<\\/")
    panel = json.dumps(PANEL_JS).replace("</", "<\\/")
    return f"<script>\n(function (CFG, PANEL) {{\n{BRIDGE_JS}\n}})({cfg}, {panel});\n</script>"


def _bridge_id(event: Any) -> str:
    """The `webrtc_id` in an event the page's script wrote (`{"n": .., "data": {...}}`)."""
    try:
        data = json.loads(event).get("data") if isinstance(event, str) and event else None
    except (ValueError, AttributeError):
        return ""
    wid = data.get("webrtc_id") if isinstance(data, dict) else None
    return wid if isinstance(wid, str) else ""


def _bridge(gr: Any, server_functions: list[Any], common: dict[str, Any]) -> dict[str, Any]:
    """Hidden textboxes (rendered, so the script can write them): `call` -> `result` runs a
    server function (`{"id", "fn", "data"}` -> `{"id", "result"}` or `{"id", "error"}`);
    `play` and `submit` carry the panel's two events."""
    boxes = {name: gr.Textbox(value="", visible="hidden", elem_id=f"batchrtc-{name}", label=name)
             for name in ("call", "result", "play", "submit")}
    by_name = {fn.__name__: fn for fn in server_functions}

    async def call(raw: str, request: gr.Request) -> str:
        try:
            msg = json.loads(raw)
            fn = by_name[msg["fn"]]
        except (ValueError, KeyError, TypeError):
            return json.dumps({"id": None, "error": "bad call"})
        try:
            if "request" in inspect.signature(fn).parameters:
                result = await fn(msg.get("data"), request)
            else:
                result = fn(msg.get("data"))
                if inspect.isawaitable(result):
                    result = await result
        except Exception as e:  # the page shows it; the session (if any) carries on
            logger.exception("/ui server function %s raised", msg.get("fn"))
            return json.dumps({"id": msg.get("id"), "error": f"{type(e).__name__}: {e}"})
        return json.dumps({"id": msg.get("id"), "result": result})

    call.__annotations__["request"] = gr.Request
    boxes["call"].change(call, inputs=[boxes["call"]], outputs=[boxes["result"]], trigger_mode="multiple", **common)
    return boxes


def _rtc_configuration_fn(stream: StreamConfig) -> Any:
    """`rtc_configuration` given as a callable (FastRTC allows sync or async, no arguments):
    called for each connection from the page through a Gradio server function (async: Gradio
    awaits it on the server's loop; a sync one runs on a worker thread), at most
    RTC_CONFIG_TIMEOUT_S."""

    async def rtc_configuration(_data: Any = None) -> Any:
        fn = stream.rtc_configuration
        result = await call_rtc_configuration(fn) if callable(fn) else fn
        return json.loads(json.dumps(result)) if result is not None else None

    return rtc_configuration
