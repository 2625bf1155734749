"""`GET /health`: 200 while the stream can take sessions, 503 (saying why) when it cannot."""

from __future__ import annotations

from typing import Any

from .collector import MetricsSources, worker_dead


def health(sources: MetricsSources) -> tuple[int, dict[str, Any]]:
    """(status code, body). Fails when a batcher is dead, or when new sessions are being
    refused because too many handler threads are stuck."""
    batchers: dict[str, Any] = {}
    failed: list[str] = []
    for name, b in sources.engines.batchers():
        dead = worker_dead(b)
        batchers[name] = {"ok": not dead, "queue_depth": b.queue_depth, "config": b.config.as_dict()}
        if dead:
            failed.append(name)
    pool = sources.pool
    if pool.exhausted:
        failed.append("handler_threads")
    body: dict[str, Any] = {
        "status": "error" if failed else "ok",
        "sessions": len(sources.sessions),
        "device": sources.engines.device(),
        "batchers": batchers,
        "handler_threads": {"busy": pool.busy, "lost": pool.lost, "lost_limit": pool.max_lost},
    }
    ray_engine = sources.engines.ray
    if ray_engine is not None:  # BATCHRTC_ENGINE=ray: this front end's calls to the replicas
        body["ray_engine"] = ray_engine.vad.bundler.stats()
    found = sources.engines.runner()
    if found is not None:  # informational: a dead child is restarted by the next batch
        runner = found[1]
        body["worker"] = {"pid": runner.pid, "restarts": runner.restarts}
    if failed:
        body["failed"] = failed
    return (503 if failed else 200), body
