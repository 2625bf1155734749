"""The face-detection video handler: every session's frames through one batched MTCNN."""

from __future__ import annotations

import threading
from typing import Any

import torch

from models.detector import FaceDetector, draw_boxes
from models.device import default_device

from .config import load_settings
from .utils import AdditionalOutputs
from .video import BatchedHandler, batched

_detector: FaceDetector | None = None
_lock = threading.Lock()


def detector() -> FaceDetector:
    """One detector per process (its weights live once on the device)."""
    global _detector
    with _lock:
        if _detector is None:
            _detector = FaceDetector(min_face_size=load_settings().min_face_size)
        return _detector


def _detect(frames: torch.Tensor, args: list[tuple[Any, ...]]) -> list[Any]:
    det = detector()
    boxes = det.detect(frames.to(det.device))
    # One copy of every frame's boxes to the host; the confidence filter is done there.
    counts = [len(b) for b in boxes]
    every = torch.cat(boxes).cpu() if sum(counts) else torch.zeros(0, 5)
    kept = []
    for b, a in zip(torch.split(every, counts), args):
        conf = float(a[0]) if a and a[0] is not None else 0.9
        kept.append(b[b[:, 4] >= conf])
    drawn = draw_boxes(frames, kept).cpu().numpy()  # one transfer back for the whole batch
    outs = []
    for i, b in enumerate(kept):
        dets = [{"box": [round(v, 1) for v in row[:4]], "score": round(row[4], 4)}
                for row in b.tolist()]
        outs.append((drawn[i], AdditionalOutputs(dets)))
    return outs


def face_detection_handler(
    max_batch_size: int | None = None, max_queue_delay_ms: float | None = None
) -> BatchedHandler:
    """A batched handler: `(frames [B,H,W,3] RGB, per-frame (confidence,)) -> frames with
    boxes drawn + AdditionalOutputs(list of {box, score})`."""
    settings = load_settings()
    return batched(
        _detect,
        max_batch_size=max_batch_size or settings.video_max_batch,
        max_queue_delay_ms=max_queue_delay_ms or settings.video_max_delay_ms,
        deadline_ms=100.0,
        # Not detector().device: with the handler in its own process, the front end never
        # loads the model (nor creates a CUDA context).
        device=default_device(),
    )
