"""`/ui` across workers: one worker serves it, the others pass its requests through.

Gradio keeps a page's queue (its `queue/join` and the `queue/data` event stream) and the
server functions our page calls in one process, while a browser spreads a page's requests over
several connections that uvicorn's workers accept at random. So with an engine process, every
worker also serves the app on a private Unix socket, the engine names one of them the UI host
(the first to announce its socket; the next one when it goes), and `UIProxy` on every other
worker forwards each `/ui` HTTP request there, streaming both ways (event streams included).
Sessions a page opens therefore live on the UI host; other requests are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import httpx

from . import engine_client

logger = logging.getLogger(__name__)

UI_PREFIX = "/ui"
_PROXIED = b"x-batchrtc-proxied"
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
               b"proxy-authenticate", b"proxy-authorization"}


class UISocketServer:
    """This worker's app on a Unix socket, for the other workers' `/ui` requests."""

    def __init__(self, app: Any, path: str) -> None:
        self.app, self.path = app, path
        self.server: Any = None

    async def start(self) -> None:
        import uvicorn

        config = uvicorn.Config(self.app, uds=self.path, lifespan="off", log_level="warning",
                                timeout_graceful_shutdown=2, ws="none")
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup()  # not serve(): that would take over this process's signal handlers
        self.server = server

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.shutdown(), 5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class UIProxy:
    """ASGI middleware: a `/ui` HTTP request on a worker that is not the UI host goes to it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._client: httpx.AsyncClient | None = None
        self._client_path: str | None = None

    def _target(self, scope: dict[str, Any]) -> str | None:
        if scope["type"] != "http" or not (scope["path"] == UI_PREFIX or scope["path"].startswith(UI_PREFIX + "/")):
            return None
        client = engine_client()
        if client is None or client.ui_host is None or client.ui_host_pid == os.getpid():
            return None
        if any(k == _PROXIED for k, _ in scope.get("headers", ())):
            return None  # already passed on once (the host moved meanwhile): serve it here
        return client.ui_host

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        target = self._target(scope)
        if target is None:
            await self.app(scope, receive, send)
            return
        await self._proxy(target, scope, receive, send)

    def _http(self, path: str) -> httpx.AsyncClient:
        if self._client is None or self._client_path != path:
            old = self._client
            self._client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path), timeout=None)
            self._client_path = path
            if old is not None:
                asyncio.ensure_future(old.aclose())
        return self._client

    async def _proxy(self, path: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def body() -> Any:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                yield msg.get("body", b"")
                if not msg.get("more_body", False):
                    return

        query = scope.get("query_string", b"")
        url = scope.get("raw_path", scope["path"].encode()) + (b"?" + query if query else b"")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        headers.append((_PROXIED, b"1"))
        http = self._http(path)
        try:
            request = http.build_request(scope["method"], "http://ui" + url.decode("latin-1"),
                                         headers=headers, content=body())
            response = await http.send(request, stream=True)
        except httpx.HTTPError as e:
            logger.warning("/ui: the UI host (%s) did not answer: %s", path, e)
            await send({"type": "http.response.start", "status": 502,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"the worker serving /ui is restarting; reload the page"})
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
