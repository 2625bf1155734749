"""Face-detection video apps for ``benchmarks/bench_video.py`` (each served by its own uvicorn).

Three ``Stream`` apps (``modality="video"``, ``mode="send-receive"``) over one real MTCNN
detector (``models.detector.FaceDetector``, one per app process, device auto: CUDA when
available, ``BATCHRTC_DEVICE`` overrides)::

    python -m uvicorn benchmarks.video_apps:batched_stream  --port P --log-level warning
    python -m uvicorn benchmarks.video_apps:perframe_stream --port P --log-level warning
    python -m uvicorn benchmarks.video_apps:echo_stream     --port P --log-level warning

* ``batched_stream``: a ``@batched`` handler. Every session's freshest frame goes through the
  shared batcher; one ``detect`` + ``draw_boxes`` call per batch on the device, one
  device->host copy of the whole batch, and per frame ``AdditionalOutputs`` with the boxes.
* ``perframe_stream``: the FastRTC-style baseline, ``fn(frame_bgr) -> frame_bgr``: one model
  call per frame (batch of 1), run on the server's handler thread pool like any user code.
* ``echo_stream``: returns the frame untouched (no model): the transport + pipeline floor.

Environment (read at import): ``BENCH_MAX_BATCH`` (64), ``BENCH_MAX_DELAY_MS`` (8),
``BENCH_DEADLINE_MS`` (100), ``BENCH_CONCURRENCY`` (512), ``BENCH_OUTPUTS`` (1; 0: the batched
handler returns frames only, no per-frame ``AdditionalOutputs`` / data-channel message),
``BENCH_WARMUP_HW`` (e.g.
``480x640``: run the detector once at that size before serving, so the first measured frames
do not pay CUDA start-up), ``BENCH_LOAD_DETECTOR`` (1; 0 skips loading it, for ``echo``).

Each app also answers ``GET /_bench/stats`` (JSON: device, batcher stats, the stream's
lifetime received/processed/dropped video frame counters and the connected sessions' sums,
CUDA memory) for the benchmark to read.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from typing import Any

import numpy as np
import torch

from models.detector import FaceDetector, draw_boxes
from server import AdditionalOutputs, Stream
from server.engine import in_uvicorn_worker
from server.video import batched

logger = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    return float(v) if v else default


MAX_BATCH = _env_int("BENCH_MAX_BATCH", 64)
MAX_DELAY_MS = _env_float("BENCH_MAX_DELAY_MS", 8.0)
DEADLINE_MS = _env_float("BENCH_DEADLINE_MS", 100.0)
CONCURRENCY = _env_int("BENCH_CONCURRENCY", 512)
OUTPUTS = os.environ.get("BENCH_OUTPUTS", "1") != "0"
STARTED = time.time()

# One detector per app process (lazily, so `echo` and `--help`-style imports stay light).
_DETECTOR: FaceDetector | None = None


def detector() -> FaceDetector:
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = FaceDetector()  # device: models.device.default_device()
        logger.info("face detector on %s", _DETECTOR.device)
    return _DETECTOR


def _boxes_to_host(boxes: list[torch.Tensor]) -> list[list[list[float]]]:
    """Per-frame ``[[x1, y1, x2, y2, score], ...]`` with one device->host copy for all."""
    counts = [int(b.shape[0]) for b in boxes]
    if sum(counts) == 0:
        return [[] for _ in boxes]
    flat = torch.cat([b for b in boxes if b.shape[0]]).float().cpu().numpy().round(1).tolist()
    out, k = [], 0
    for c in counts:
        out.append(flat[k : k + c])
        k += c
    return out


# ------------------------------------------------------------------------------- batched
@batched(max_batch_size=MAX_BATCH, max_queue_delay_ms=MAX_DELAY_MS, deadline_ms=DEADLINE_MS)
def detect_faces_batched(frames: torch.Tensor, args: list[tuple]) -> list[Any]:
    """``frames``: uint8 RGB ``[B, H, W, 3]`` on the detector's device (the batcher put it there)."""
    det = detector()
    boxes = det.detect(frames)
    drawn = draw_boxes(frames, boxes)
    host = drawn.cpu().numpy()  # one transfer back for the whole batch
    if not OUTPUTS:
        return [host[i] for i in range(host.shape[0])]
    found = _boxes_to_host(boxes)
    return [(host[i], AdditionalOutputs({"faces": len(found[i]), "boxes": found[i]}))
            for i in range(host.shape[0])]


# ------------------------------------------------------------------- batched, send-only
_SCENES: dict[tuple[int, int], Any] = {}


def _frame_index(frame_rgb: np.ndarray) -> int:
    """The bench's barcode index of one RGB frame (-1 if unreadable): a send-only session has no
    frame coming back to read it from, so the detections carry it."""
    from benchmarks.bench_video import Scene

    h, w = frame_rgb.shape[:2]
    scene = _SCENES.get((h, w))
    if scene is None:
        scene = _SCENES[(h, w)] = Scene(w, h, 30.0)
    band = frame_rgb[h - scene.bs:].astype(np.float32)
    y = np.zeros((h, w), np.float32)
    y[h - scene.bs:] = band @ np.array([0.299, 0.587, 0.114], np.float32)  # luma of the barcode row
    return scene.read_index(y)


@batched(max_batch_size=MAX_BATCH, max_queue_delay_ms=MAX_DELAY_MS, deadline_ms=DEADLINE_MS)
def detect_faces_send(frames: torch.Tensor, args: list[tuple]) -> list[Any]:
    """``mode="send"``: detections only (no frame drawn, none sent back), each with its frame's index."""
    det = detector()
    found = _boxes_to_host(det.detect(frames))
    host = frames.cpu().numpy()
    return [AdditionalOutputs({"faces": len(found[i]), "boxes": found[i], "index": _frame_index(host[i])})
            for i in range(host.shape[0])]


# ------------------------------------------------------------------------------ per frame
def detect_faces_perframe(frame_bgr: np.ndarray) -> np.ndarray:
    """FastRTC-style handler: one BGR frame in, one BGR frame out, one model call."""
    det = detector()
    rgb = torch.from_numpy(np.ascontiguousarray(frame_bgr[..., ::-1]))[None].to(det.device)
    boxes = det.detect(rgb)
    out = draw_boxes(rgb, boxes)[0].cpu().numpy()
    return np.ascontiguousarray(out[..., ::-1])


def echo(frame_bgr: np.ndarray) -> np.ndarray:
    return frame_bgr


# ---------------------------------------------------------------------------------- apps
def _stream(handler: Any, mode: str = "send-receive") -> Stream:
    stream = Stream(handler, modality="video", mode=mode, concurrency_limit=CONCURRENCY)

    @stream.get("/_bench/stats")
    def _stats() -> dict:  # sync route: runs on Starlette's thread pool, not the media loop
        return bench_stats(stream)

    return stream


def bench_stats(stream: Stream) -> dict:
    # Lifetime frame counters (`batchrtc_video_frames_total`: connected sessions plus those
    # that ended, folded in when they end), so a window's difference never goes negative.
    # Summing only the connected sessions did: a session that ended inside the window took
    # its frames out of the second reading.
    live = {"received": 0, "processed": 0, "dropped": 0}
    for s in list(stream.sessions.values()):
        v = getattr(s, "video", None)
        if v is not None:
            for k in live:
                live[k] += int(getattr(v, k, 0))
    registry = stream.metrics_registry
    video = {
        k: int(registry.get_sample_value("batchrtc_video_frames_total", {"outcome": k}) or 0)
        for k in live
    }
    h = stream.handler
    b = getattr(h, "_batcher", None)  # never create the batcher just to read it
    dev = _DETECTOR.device if _DETECTOR is not None else None
    if dev is None and getattr(h, "process", False):
        dev = h.device  # the model lives in the handler's child process
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "uptime_s": time.time() - STARTED,
        "device": str(dev) if dev is not None else "none",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sessions": len(stream.sessions),
        "video": video,
        "video_live": live,
        "batcher": b.stats.snapshot() if b is not None else None,
        "config": {"max_batch": MAX_BATCH, "max_delay_ms": MAX_DELAY_MS,
                   "deadline_ms": DEADLINE_MS, "concurrency": CONCURRENCY, "outputs": OUTPUTS},
    }
    if dev is not None and dev.type == "cuda" and _DETECTOR is not None:  # never init CUDA here
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        out["gpu_name"] = torch.cuda.get_device_name(idx)
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(idx) / 2**20
        out["cuda_reserved_mib"] = torch.cuda.memory_reserved(idx) / 2**20
    return out


def _warmup() -> None:
    """Load the detector and run it once at the benchmark's frame size (and, on CUDA, at the
    largest batch too): the first sessions then do not measure CUDA/kernel start-up. With the
    batched handler in its own process that happens there (it imports this module), not in
    the front end."""
    if os.environ.get("BENCH_LOAD_DETECTOR", "1") == "0":
        return
    if detect_faces_batched.process and multiprocessing.parent_process() is None:
        return
    if in_uvicorn_worker():  # `--workers N`: the model runs in the engine process (it imports this module)
        return
    det = detector()
    hw = os.environ.get("BENCH_WARMUP_HW", "").strip()
    if not hw:
        return
    h, w = (int(v) for v in hw.lower().split("x"))
    sizes = [1] + ([MAX_BATCH] if det.device.type == "cuda" else [])
    for b in sizes:
        x = torch.full((b, h, w, 3), 110, dtype=torch.uint8, device=det.device)
        draw_boxes(x, det.detect(x))
    if det.device.type == "cuda":
        torch.cuda.synchronize(det.device)


_warmup()
batched_stream = _stream(detect_faces_batched)
batched_send_stream = _stream(detect_faces_send, mode="send")
perframe_stream = _stream(detect_faces_perframe)
echo_stream = _stream(echo)
