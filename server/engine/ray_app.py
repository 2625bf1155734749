"""`BATCHRTC_ENGINE=ray`: the VAD engine as a Ray Serve deployment, and a front end's line to it.

Importing this module imports Ray (the `ray` extra: `pip install -e ".[ray]"`); nothing else of
the server does. The deployment is `VADDeployment` (the replica core is
`server.engine.ray_vad.VADReplica`); `app` and `build` are what `serve run` and a KubeRay
RayService's `import_path` name (see docs/ray.md). A front end joins the cluster that Ray's own
`RAY_ADDRESS` names (a `ray start` cluster on this machine when unset), finds the Serve
application `BATCHRTC_RAY_APP` ("batchrtc"), and deploys it there if it is missing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from server.config import Settings

from .ray_vad import Call, RayVAD, Results, VADReplica

logger = logging.getLogger(__name__)

DEPLOYMENT = "silero_vad"


@serve.deployment(
    name=DEPLOYMENT,
    # Calls in flight per replica. Each holds up to 512 items in the replica's state table
    # (VADReplica's capacity, 8192); more calls than this wait in Serve's queue instead.
    max_ongoing_requests=8,
    # One access-log line per call would be thousands of lines a second.
    logging_config={"enable_access_log": False},
)
class VADDeployment(VADReplica):
    def replica_actor(self) -> str:
        """This replica's Ray actor name (namespace "serve"): tests kill it by name."""
        return ray.get_runtime_context().get_actor_name() or ""


def build(args: dict[str, str]) -> Any:
    """Serve's application builder: `serve run server.engine.ray_app:build max_batch_size=256`
    (a RayService passes the same keys as `args`)."""
    kinds = {"device": str, "max_batch_size": int, "max_queue_delay_ms": float, "threads": int, "capacity": int}
    unknown = set(args) - set(kinds)
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {sorted(kinds)}")
    return VADDeployment.bind(**{k: kinds[k](v) for k, v in args.items()})


app = VADDeployment.bind()


def connect(settings: Settings) -> DeploymentHandle:
    """Join the cluster and return a handle to the VAD deployment, deploying it when the
    application is missing (blocking: run it off the event loop)."""
    address = os.environ.get("RAY_ADDRESS") or "auto"
    if not ray.is_initialized():
        try:
            # Replica logs stay in Ray's own log files, not on this server's console.
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise RuntimeError(
                f"BATCHRTC_ENGINE=ray: no Ray cluster at RAY_ADDRESS={address!r} ({e}). Start one "
                "(`ray start --head`) or set RAY_ADDRESS to its address") from e
    try:
        return serve.get_app_handle(settings.ray_app)
    except RayServeException:
        pass  # no Serve on the cluster yet, or not this application
    logger.warning("ray engine: no Serve application %r on the cluster; deploying it", settings.ray_app)
    serve.start(proxy_location="Disabled")  # front ends call it by handle: no HTTP proxy
    return serve.run(
        VADDeployment.bind(max_batch_size=settings.vad_max_batch, max_queue_delay_ms=settings.vad_max_delay_ms,
                           threads=settings.vad_threads),
        name=settings.ray_app, route_prefix=None,
    )


class RayEngine:
    """A front-end process's Ray engine: the handle and the `RayVAD` its sessions use."""

    def __init__(self, handle: DeploymentHandle, *, max_items: int = 512, timeout_s: float = 10.0) -> None:
        self.handle = handle
        self._process = handle.options(method_name="process")
        self.vad = RayVAD(self._send, max_items=max_items, timeout_s=timeout_s)

    async def _send(self, call: Call) -> Results:
        return await self._process.remote(call)

    @classmethod
    async def connect(cls, settings: Settings) -> RayEngine:
        handle = await asyncio.to_thread(connect, settings)
        return cls(handle, max_items=settings.vad_max_batch, timeout_s=max(settings.engine_hang_s, 1.0))

    async def close(self) -> None:
        await self.vad.close()
