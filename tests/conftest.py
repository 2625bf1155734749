"""Shared test plumbing: a real uvicorn server on loopback, in a background thread
(`benchmarks.harness.ServerThread`, which the soak benchmark uses too)."""

from __future__ import annotations

import os

# WebRTC in tests runs on loopback only (aioice would offer every interface but loopback).
os.environ.setdefault("BATCHRTC_ICE_HOSTS", "127.0.0.1")

from collections.abc import Callable, Iterator

import pytest

from benchmarks.harness import ServerThread


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
