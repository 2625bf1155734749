"""Configuration, in two frozen values: what the operator set and what the app's author set.

`Settings` holds the `BATCHRTC_*` environment variables (the README lists them in one table;
`BATCHRTC_DEVICE` alone is read by `models.device`, the model layer's own setting);
`load_settings()` reads them each time it is called (tests change them between servers) and a
`Stream` reads them once, when it is built. `StreamConfig` is what was passed to `Stream(...)`,
validated. Front ends, sessions, the UI and the docs read these two, never the `Stream`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict
from urllib.parse import urlsplit

Modality = Literal["video", "audio", "audio-video"]
Mode = Literal["send-receive", "receive", "send"]
MODALITIES = ("video", "audio", "audio-video")
MODES = ("send-receive", "receive", "send")
ENGINES = ("auto", "process", "inprocess", "ray")


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _flag(name: str) -> bool | None:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    if raw:
        raise ValueError(f"{name} must be 1 or 0, got {raw!r}")
    return None


@dataclass(frozen=True)
class Settings:
    # Sessions the default apps accept (`server.app`: 64, `server.echo_app`: 256 when unset).
    concurrency: int | None = None
    # The shared Silero VAD engine: its batcher and the torch threads of its batch thread
    # (None: 1 on CPU, torch's default on CUDA; see server/vad_engine.py).
    vad_max_batch: int = 512
    vad_max_delay_ms: float = 20.0
    vad_threads: int | None = None
    # The default app's batched face detector.
    video_max_batch: int = 64
    video_max_delay_ms: float = 8.0
    # Its smallest face (pixels): the speed knob, stage 1 costs about (40 / this)^2 of the
    # default's (see models.detector.FaceDetector).
    min_face_size: int = 40
    # Batched video handlers in a worker process of their own (None: on CUDA only).
    video_process: bool | None = None
    # Video frames larger than this (width x height) end their session with a clear error.
    # Full HD: more than any webcam the default app expects; 4K frames cost ~27x a 640x480 one.
    video_max_pixels: int = 1920 * 1080
    # Pixels per second one session may send through its video handler; frames beyond it are
    # dropped (counted), so one large camera cannot starve everyone's batches. 720p at 30 fps.
    video_pixel_rate: int = 1280 * 720 * 30
    # Threads for sync handler calls, and how many may be stuck in calls nobody waits for
    # before new sessions are refused (see server/handler_pool.py).
    handler_threads: int = 256
    handler_threads_lost: int = 256
    # Public base URL (https://host[:port][/prefix]) for the telephone webhook's media-stream
    # URL. Unset: taken from the request's Host header, which a client can spoof.
    public_url: str | None = None
    # Pin ICE host candidates to these addresses (aioice otherwise offers every interface but
    # loopback): `BATCHRTC_ICE_HOSTS=127.0.0.1` for tests and benchmarks on loopback.
    ice_hosts: tuple[str, ...] = ()
    # Where the batchers run: "auto" (in an engine process when uvicorn runs several workers,
    # in-process otherwise; "local" says the same), "process", "inprocess", or "ray" (the VAD
    # on engine replicas of a Ray Serve deployment, the cluster named by Ray's own RAY_ADDRESS;
    # needs the `ray` extra); see server/engine/ and docs/ray.md.
    engine: str = "auto"
    # Shared memory one front-end process may hold for payloads in flight to the engine.
    engine_shm_mb: int = 1024
    # An engine that answers no ping for this long is taken as hung: killed and restarted.
    engine_hang_s: float = 10.0
    # BATCHRTC_ENGINE=ray: the Serve application front ends call (deployed by the first front
    # end that finds it missing, or by `serve deploy` / a KubeRay RayService).
    ray_app: str = "batchrtc"
    # BATCHRTC_ENGINE=ray: a front end's lease on its sessions in the cluster's session
    # directory. A front end that stops renewing it (killed, cut off) has its sessions
    # released this long after its last renewal; the first front end to create the directory
    # sets it.
    ray_lease_s: float = 10.0


def load_settings() -> Settings:
    public = os.environ.get("BATCHRTC_PUBLIC_URL", "").strip() or None
    if public is not None:
        parts = urlsplit(public)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"BATCHRTC_PUBLIC_URL must be an http(s) URL like https://example.com, got {public!r}")
    vad_threads = os.environ.get("BATCHRTC_VAD_THREADS", "").strip()
    engine = os.environ.get("BATCHRTC_ENGINE", "").strip().lower() or "auto"
    if engine == "local":  # the name for today's default
        engine = "auto"
    if engine not in ENGINES:
        raise ValueError(f"BATCHRTC_ENGINE must be local, auto, process, inprocess or ray, got {engine!r}")
    return Settings(
        concurrency=_int("BATCHRTC_CONCURRENCY", 0) or None,
        vad_max_batch=_int("BATCHRTC_VAD_MAX_BATCH", Settings.vad_max_batch),
        vad_max_delay_ms=_float("BATCHRTC_VAD_MAX_DELAY_MS", Settings.vad_max_delay_ms),
        vad_threads=_int("BATCHRTC_VAD_THREADS", 0, minimum=0) if vad_threads else None,
        video_max_batch=_int("BATCHRTC_VIDEO_MAX_BATCH", Settings.video_max_batch),
        video_max_delay_ms=_float("BATCHRTC_VIDEO_MAX_DELAY_MS", Settings.video_max_delay_ms),
        min_face_size=_int("BATCHRTC_MIN_FACE_SIZE", Settings.min_face_size, minimum=12),
        video_process=_flag("BATCHRTC_VIDEO_PROCESS"),
        video_max_pixels=_int("BATCHRTC_VIDEO_MAX_PIXELS", Settings.video_max_pixels),
        video_pixel_rate=_int("BATCHRTC_VIDEO_PIXEL_RATE", Settings.video_pixel_rate),
        handler_threads=_int("BATCHRTC_HANDLER_THREADS", Settings.handler_threads),
        handler_threads_lost=_int("BATCHRTC_HANDLER_THREADS_LOST", Settings.handler_threads_lost),
        public_url=public.rstrip("/") if public else None,
        ice_hosts=tuple(h.strip() for h in os.environ.get("BATCHRTC_ICE_HOSTS", "").split(",") if h.strip()),
        engine=engine,
        engine_shm_mb=_int("BATCHRTC_ENGINE_SHM_MB", Settings.engine_shm_mb),
        engine_hang_s=_float("BATCHRTC_ENGINE_HANG_S", Settings.engine_hang_s) or Settings.engine_hang_s,
        ray_app=os.environ.get("BATCHRTC_RAY_APP", "").strip() or Settings.ray_app,
        ray_lease_s=_float("BATCHRTC_RAY_LEASE_S", Settings.ray_lease_s) or Settings.ray_lease_s,
    )


def uvicorn_deflate_left_on(argv: list[str] | None = None,
                            environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is uvicorn's command line with WebSocket permessage-deflate left
    on (uvicorn's default). An ASGI app cannot refuse the extension itself (uvicorn negotiates
    it before the app sees the socket), so the app says so at start instead: compressing every
    20 ms audio frame made p50 reply latency 3.8 s at 200 sessions (bench_reply)."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    if not argv or "uvicorn" not in argv[0]:  # `uvicorn ...` or `python -m uvicorn ...`
        return False
    value = environ.get("UVICORN_WS_PER_MESSAGE_DEFLATE")
    for i, arg in enumerate(argv):
        if arg == "--ws-per-message-deflate" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--ws-per-message-deflate="):
            value = arg.split("=", 1)[1]
    return value is None or value.strip().lower() not in ("false", "0", "no", "off", "f", "n")


class UIArgs(TypedDict, total=False):
    """FastRTC's `Stream(ui_args=...)` keys. The generated `/ui` uses `title`, `subtitle`,
    `icon`, `hide_title` and `send_input_on`; `icon_button_color`, `pulse_color`,
    `icon_radius` and `full_screen` style FastRTC's own WebRTC component and are accepted
    and ignored here."""

    title: str
    subtitle: str
    icon: str
    icon_button_color: str
    pulse_color: str
    icon_radius: int
    send_input_on: Literal["submit", "change"]
    hide_title: bool
    full_screen: bool


@dataclass(frozen=True)
class StreamConfig:
    """A `Stream`'s arguments (FastRTC's names), validated once by `StreamConfig.build`."""

    modality: Modality = "video"
    mode: Mode = "send-receive"
    concurrency_limit: int = 1
    time_limit: float | None = None
    allow_extra_tracks: bool = False
    rtp_params: Mapping[str, Any] | None = None
    rtc_configuration: Mapping[str, Any] | Callable[..., Any] | None = None
    # a dict, or a callable returning one per offer (fresh time-limited TURN credentials)
    server_rtc_configuration: Mapping[str, Any] | Callable[[], Any] | None = None
    track_constraints: Mapping[str, Any] | None = None
    additional_inputs: tuple[Any, ...] = ()
    additional_outputs: tuple[Any, ...] = ()
    additional_outputs_handler: Callable[..., Any] | None = None
    ui_args: Mapping[str, Any] = field(default_factory=dict)
    verbose: bool = True
    # Per-call limit for handler calls that should return promptly (receive, per-frame
    # video); a call that outlives it ends its session. `emit` may wait: no limit there.
    handler_timeout: float | None = 30.0
    input_sample_rate: int = 48000  # the handler's, as the front ends deliver audio
    output_sample_rate: int = 24000
    handler_name: str = ""  # for the docs pages
    can_interrupt: bool | None = None  # ReplyOnPause's, for the docs pages
    settings: Settings = field(default_factory=Settings)

    @property
    def default_args(self) -> list[Any]:
        """The additional inputs' initial values: what a handler gets before `set_input`."""
        return [getattr(c, "value", None) for c in self.additional_inputs]

    @classmethod
    def build(
        cls,
        handler: Any,
        *,
        modality: str = "video",
        mode: str = "send-receive",
        concurrency_limit: Any = "default",
        time_limit: float | None = None,
        additional_inputs: list[Any] | None = None,
        additional_outputs: list[Any] | None = None,
        additional_outputs_handler: Callable[..., Any] | None = None,
        handler_timeout: float | None = 30.0,
        ui_args: Mapping[str, Any] | None = None,
        settings: Settings | None = None,
        **rest: Any,
    ) -> StreamConfig:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be 'video', 'audio' or 'audio-video', got {modality!r}")
        if mode not in MODES:
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
        server_rtc = rest.get("server_rtc_configuration")
        if server_rtc is not None and not callable(server_rtc):
            from .ice_servers import aiortc_configuration  # aiortc only when a dict is given

            aiortc_configuration(server_rtc)  # a typo fails here, not at every offer
        return cls(
            modality=modality,  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
            concurrency_limit=limit,
            time_limit=time_limit,
            additional_inputs=tuple(additional_inputs or ()),
            additional_outputs=tuple(additional_outputs or ()),
            additional_outputs_handler=additional_outputs_handler,
            handler_timeout=handler_timeout,
            ui_args=dict(ui_args or {}),
            input_sample_rate=int(getattr(handler, "input_sample_rate", 48000)),
            output_sample_rate=int(getattr(handler, "output_sample_rate", 24000)),
            handler_name=str(getattr(handler, "__name__", None) or type(handler).__name__),
            can_interrupt=getattr(handler, "can_interrupt", None),
            settings=settings if settings is not None else load_settings(),
            **rest,
        )
