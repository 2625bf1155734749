"""Shared test plumbing: a real uvicorn server on loopback, in a background thread."""

from __future__ import annotations

import os

# WebRTC in tests runs on loopback only (aioice would offer every interface but loopback).
os.environ.setdefault("BATCHRTC_ICE_HOSTS", "127.0.0.1")

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn


class ServerThread:
    def __init__(self, app: object) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            ws_ping_interval=None,
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def serve() -> Iterator[Callable[[object], ServerThread]]:
    """`serve(app)` starts a real uvicorn server for `app` and returns it; stopped after."""
    started: list[ServerThread] = []

    def start(app: object) -> ServerThread:
        s = ServerThread(app).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
