"""`GET /metrics` (Prometheus text format) and `GET /health` for one stream.

`collector.py` reads the stream's live state at scrape time, `replicas.py` fetches the Ray
engine replicas' statistics (BATCHRTC_ENGINE=ray), `state.py` keeps the totals that outlive
sessions, `gpu.py` reads GPUs through NVML, `health.py` answers `/health`. A session reports into
its stream's `StreamMetrics` through the two hooks below, which never raise.
"""

from __future__ import annotations

import asyncio

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .collector import MetricsSources, StreamCollector
from .health import health
from .gpu import Nvml
from .replicas import ReplicaCollector
from .state import StreamMetrics

logger = logging.getLogger(__name__)

__all__ = [
    "MetricsSources",
    "Nvml",
    "ReplicaCollector",
    "StreamCollector",
    "StreamMetrics",
    "build_registry",
    "health",
    "record_handler_error",
    "register_batcher",
    "router",
    "session_closed",
]


def _state_of(session: Any) -> StreamMetrics:
    state = getattr(session, "metrics", None)
    if state is None:  # a session-like object that only knows its stream
        state = session.stream.stream_metrics
    return state


def record_handler_error(session: Any, exc: BaseException) -> None:
    """Count a handler error of `session`, by front-end kind and class: ``warning`` (a
    FastRTC `Warning`, shown to the user as a warning) or ``error`` (anything else)."""
    try:
        from ..utils import Warning as FastRTCWarning

        _state_of(session).handler_error(str(getattr(session, "kind", "unknown")), isinstance(exc, FastRTCWarning))
    except Exception:  # metrics must never hurt a session
        logger.debug("record_handler_error failed", exc_info=True)


def session_closed(session: Any) -> None:
    """Fold a closing session's video counters into the lifetime total. Idempotent."""
    try:
        _state_of(session).retire(session)
    except Exception:
        logger.debug("session_closed failed", exc_info=True)


def register_batcher(stream: Any, batcher: Any) -> None:
    """Also report `batcher` (a `DynamicBatcher` the app runs itself) on `stream`'s
    `/metrics` and `/health`. Held weakly."""
    stream.engines.register_batcher(batcher)


def build_registry(sources: MetricsSources) -> CollectorRegistry:
    """A fresh registry with this stream's collector plus process/platform/GC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamCollector(sources))
    # With BATCHRTC_ENGINE=ray the VAD batcher is in the engine replicas: theirs, fetched.
    registry.register(ReplicaCollector(sources.engines.replica_stats))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def router(sources: MetricsSources) -> APIRouter:
    """`GET /metrics` and `GET /health` for one stream."""
    registry = build_registry(sources)
    r = APIRouter()

    def metrics() -> Response:
        # A sync route: Starlette runs it on its thread pool, so NVML queries and the
        # percentile maths never run on the event loop.
        text = generate_latest(registry)
        client = sources.engines.client
        if client is not None and client.loop is not None:
            # The engine process's batchers and every worker's sessions: one scrape of any
            # worker sees them all (its families are named batchrtc_engine_*).
            try:
                fut = asyncio.run_coroutine_threadsafe(client.metrics_text(), client.loop)
                text += fut.result(timeout=client.hang_timeout_s).encode()
            except Exception as e:
                text += (b"# HELP batchrtc_engine_up The engine process answers (1).\n"
                         b"# TYPE batchrtc_engine_up gauge\nbatchrtc_engine_up 0\n")
                logger.warning("metrics: the engine did not answer: %s", e)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def health_route() -> JSONResponse:
        status, body = health(sources)
        client = sources.engines.client
        if client is not None:
            try:
                st = await asyncio.wait_for(client.status(), client.hang_timeout_s)
                body["engine"] = {"up": True, "pid": st["pid"], "restarts": st["restarts"],
                                  "workers": len(st["workers"]), "sessions": st["sessions"],
                                  "batchers": {b["name"]: {"queue_depth": b["queue_depth"], "batches": b["batches"]}
                                               for b in st["batchers"]}}
            except Exception as e:
                body["engine"] = {"up": False, "error": f"{type(e).__name__}: {e}"[:300]}
                body["status"] = "error"
                body.setdefault("failed", []).append("engine")
                status = 503
        return JSONResponse(body, status_code=status)

    r.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    r.add_api_route("/health", health_route, methods=["GET"], name="health")
    r.metrics_registry = registry  # type: ignore[attr-defined]
    return r
