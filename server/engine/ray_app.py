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

from .ray_directory import SessionDirectory, SessionsClient
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

    def stats(self) -> dict[str, Any]:
        """`VADReplica.stats` and who this replica is: Serve's replica id (the `replica` tag of
        Serve's own metrics), application, deployment, and its process id."""
        ctx = serve.get_replica_context()
        return {**super().stats(), "replica": ctx.replica_id.unique_id, "application": ctx.app_name,
                "deployment": ctx.deployment, "pid": os.getpid()}


def build(args: dict[str, str]) -> Any:
    """Serve's application builder: `serve run server.engine.ray_app:build max_batch_size=256`
    (a RayService passes the same keys as `args`)."""
    kinds = {"device": str, "max_batch_size": int, "max_queue_delay_ms": float, "threads": int, "capacity": int}
    unknown = set(args) - set(kinds)
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {sorted(kinds)}")
    return VADDeployment.bind(**{k: kinds[k](v) for k, v in args.items()})


app = VADDeployment.bind()


def join_cluster() -> None:
    """Join the cluster Ray's own `RAY_ADDRESS` names (blocking), unless already joined."""
    address = os.environ.get("RAY_ADDRESS") or "auto"
    if not ray.is_initialized():
        try:
            # Replica logs stay in Ray's own log files, not on this server's console.
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise RuntimeError(
                f"BATCHRTC_ENGINE=ray: no Ray cluster at RAY_ADDRESS={address!r} ({e}). Start one "
                "(`ray start --head`) or set RAY_ADDRESS to its address") from e


def connect(settings: Settings) -> DeploymentHandle:
    """Join the cluster and return a handle to the VAD deployment, deploying it when the
    application is missing (blocking: run it off the event loop)."""
    join_cluster()
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
    """A front-end process's Ray engine: the handle and the `RayVAD` its sessions use.
    `origin` names this front end to the replicas (their batch statistics count items by it)."""

    def __init__(self, handle: DeploymentHandle, *, max_items: int = 512, timeout_s: float = 10.0,
                 origin: str = "") -> None:
        self.handle = handle
        self.origin = origin
        self._process = handle.options(method_name="process")
        self.vad = RayVAD(self._send, max_items=max_items, timeout_s=timeout_s)

    async def _send(self, call: Call) -> Results:
        return await self._process.remote(call, self.origin)

    def replica_stats(self, timeout_s: float) -> list[dict[str, Any] | BaseException]:
        """Every running replica's `stats()`, or the exception its call raised (Serve's
        broadcast: one call per replica, for control-plane reads such as a `/metrics` scrape).
        Blocking, at most `timeout_s`: call it off the event loop. Raises TimeoutError past
        it, and Serve's error when the deployment has no replica."""
        return self.handle.broadcast("stats").results(timeout_s=timeout_s, return_exceptions=True)

    @classmethod
    async def connect(cls, settings: Settings, origin: str = "") -> RayEngine:
        handle = await asyncio.to_thread(connect, settings)
        return cls(handle, max_items=settings.vad_max_batch, timeout_s=max(settings.engine_hang_s, 1.0),
                   origin=origin)

    async def close(self) -> None:
        await self.vad.close()


# -- the session directory -----------------------------------------------------------------------
NAMESPACE = "batchrtc"


@ray.remote(
    num_cpus=0,  # bookkeeping: it must not take a CPU a replica needs
    max_restarts=-1,  # restarted empty (a new epoch): front ends claim their sessions again
    max_concurrency=4096,  # one long poll in flight per front end, plus claims and relays
)
class SessionDirectoryActor(SessionDirectory):
    """`SessionDirectory` as a Ray async actor (server/engine/ray_directory.py)."""


def directory_name(settings: Settings) -> str:
    return f"{settings.ray_app}-sessions"


def directory_actor(settings: Settings) -> Any:
    """The cluster's session directory for this application, created by whoever asks first
    (blocking). Named in its own namespace so every front end finds it whatever namespace its
    job runs in; detached so it outlives the front end that created it."""
    join_cluster()
    return SessionDirectoryActor.options(
        name=directory_name(settings), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        # On the head node (the resource Ray gives it), not on a front end's node that may go away
        # with its pod: a restart would make every front end claim its sessions again.
        resources={"node:__internal_head__": 0.001},
    ).remote(lease_s=settings.ray_lease_s)


class _DirectoryLine:
    """`invoke(name, *args)` for a `SessionsClient`: an actor call. A directory that died for good
    is asked for again (get_if_exists makes a new one; front ends see its new epoch and rejoin)."""

    def __init__(self, settings: Settings, actor: Any) -> None:
        self.settings = settings
        self.actor = actor

    async def __call__(self, name: str, *args: Any) -> Any:
        try:
            return await getattr(self.actor, name).remote(*args)
        except ray.exceptions.ActorDiedError:
            self.actor = await asyncio.to_thread(directory_actor, self.settings)
            raise


async def connect_sessions(settings: Settings) -> SessionsClient:
    """This front end's `SessionsClient`, joined to the cluster's session directory."""
    actor = await asyncio.to_thread(directory_actor, settings)
    client = SessionsClient(_DirectoryLine(settings, actor), lease_s=settings.ray_lease_s,
                            timeout_s=max(settings.engine_hang_s, 1.0))
    await client.start()
    return client
