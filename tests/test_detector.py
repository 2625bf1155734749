"""models.detector: batched MTCNN on a real photo, frames kept apart in a batch, NMS, drawing.

The photo is ``skimage.data.astronaut()`` (public-domain NASA portrait of Eileen Collins,
512x512 RGB) saved once as ``tests/fixtures/astronaut.png``; scikit-image is not needed here.
The MTCNN weights come from the facenet-pytorch wheel: ``pip install --no-deps
facenet-pytorch==2.6.0``.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models.detector as detector_mod
from models.detector import FaceDetector, batched_nms, draw_boxes

FIXTURE = Path(__file__).parent / "fixtures" / "astronaut.png"
# The face in the 512x512 astronaut picture (checked by eye on the drawn detection): the box
# spans about x 180-268, y 61-172, so its centre is near (224, 116).
FACE_CENTER_X = (200.0, 250.0)
FACE_CENTER_Y = (95.0, 140.0)
FACE_SIDE = (65.0, 130.0)  # width and height of the box


@functools.lru_cache(maxsize=None)
def detector() -> FaceDetector:
    return FaceDetector("cpu")


@functools.lru_cache(maxsize=None)
def _astronaut_np() -> np.ndarray:
    with Image.open(FIXTURE) as im:
        return np.asarray(im.convert("RGB")).copy()


def astronaut() -> torch.Tensor:
    return torch.from_numpy(_astronaut_np().copy())


def assert_astronaut_face(dets: torch.Tensor) -> None:
    assert dets.shape == (1, 5), dets
    x1, y1, x2, y2, score = dets[0].tolist()
    assert score > 0.95
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    assert FACE_CENTER_X[0] < cx < FACE_CENTER_X[1], dets
    assert FACE_CENTER_Y[0] < cy < FACE_CENTER_Y[1], dets
    assert FACE_SIDE[0] < x2 - x1 < FACE_SIDE[1], dets
    assert FACE_SIDE[0] < y2 - y1 < FACE_SIDE[1], dets


# ------------------------------------------------------------------------- real detections
def test_astronaut_has_one_face_where_expected() -> None:
    img = astronaut()
    assert img.shape == (512, 512, 3)
    out = detector().detect(img[None])
    assert isinstance(out, list) and len(out) == 1
    assert out[0].dtype == torch.float32 and out[0].device == img.device
    assert_astronaut_face(out[0])


def test_batch_keeps_frames_apart() -> None:
    img = astronaut()
    w = img.shape[1]
    frames = torch.stack([img, torch.zeros_like(img), img.flip(1), torch.full_like(img, 128), img])
    out = detector().detect(frames)
    assert [len(o) for o in out] == [1, 0, 1, 0, 1]
    single = detector().detect(img[None])[0]
    torch.testing.assert_close(out[0], single, atol=1e-3, rtol=0)
    torch.testing.assert_close(out[4], single, atol=1e-3, rtol=0)
    assert_astronaut_face(out[0])
    # The flipped frame's face is the mirror image of the original one (MTCNN is not exactly
    # flip-equivariant, so a few pixels of slack).
    x1, y1, x2, y2, score = out[2][0].tolist()
    ox1, oy1, ox2, oy2, _ = single[0].tolist()
    assert score > 0.95
    np.testing.assert_allclose([x1, y1, x2, y2], [w - ox2, oy1, w - ox1, oy2], atol=10)
    assert abs((x1 + x2) / 2 - (ox1 + ox2) / 2) > 30  # really on the other side


def test_degenerate_batches() -> None:
    det = detector()
    assert det.detect(torch.zeros(0, 64, 64, 3, dtype=torch.uint8)) == []
    tiny = det.detect(torch.zeros(2, 20, 30, 3, dtype=torch.uint8))  # smaller than min_face_size
    assert len(tiny) == 2 and all(t.shape == (0, 5) for t in tiny)
    with pytest.raises(TypeError):
        det.detect(torch.zeros(1, 64, 64, 3))
    with pytest.raises(ValueError):
        det.detect(torch.zeros(64, 64, 3, dtype=torch.uint8))


def test_missing_weights_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detector_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps facenet-pytorch==2\.6\.0"):
        FaceDetector("cpu")


# ------------------------------------------------------------------------------------- NMS
def reference_nms(boxes: list[list[float]], scores: list[float], groups: list[int],
                  threshold: float, mode: str = "union", offset: float = 0.0) -> list[int]:
    """Textbook greedy NMS, one box at a time, per group; kept indices by decreasing score."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept: list[int] = []
    for i in order:
        ok = True
        for j in kept:
            if groups[j] != groups[i]:
                continue
            a, b = boxes[i], boxes[j]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + offset)
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + offset)
            inter = iw * ih
            area_a = (a[2] - a[0] + offset) * (a[3] - a[1] + offset)
            area_b = (b[2] - b[0] + offset) * (b[3] - b[1] + offset)
            denom = min(area_a, area_b) if mode == "min" else area_a + area_b - inter
            if inter / denom > threshold:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


def test_batched_nms_small_case() -> None:
    boxes = torch.tensor([
        [0, 0, 10, 10],     # 0: kept (best of group 0)
        [1, 1, 11, 11],     # 1: IoU 0.68 with 0 -> dropped
        [0, 0, 10, 10],     # 2: same box as 0 but frame 1 -> kept
        [20, 20, 30, 30],   # 3: disjoint -> kept
        [0, 0, 5, 10],      # 4: IoU 0.5 with 0 (not > 0.5) -> kept; "min" overlap 1.0
    ], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    groups = torch.tensor([0, 0, 1, 0, 0])
    assert batched_nms(boxes, scores, groups, 0.5).tolist() == [0, 2, 3, 4]
    assert batched_nms(boxes, scores, groups, 0.5, mode="min").tolist() == [0, 2, 3]
    assert batched_nms(boxes[:0], scores[:0], groups[:0], 0.5).tolist() == []


@pytest.mark.parametrize("mode,offset", [("union", 0.0), ("min", 1.0)])
def test_batched_nms_matches_reference(mode: str, offset: float) -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        n = [0, 1, 2, 300][trial] if trial < 4 else int(torch.randint(5, 400, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 120
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 50 + 2], dim=1)
        scores = torch.rand(n, generator=g)
        groups = torch.randint(0, 4, (n,), generator=g) * 3  # sparse group ids
        thr = [0.3, 0.5, 0.7][trial % 3]
        got = batched_nms(boxes, scores, groups, thr, mode=mode, offset=offset).tolist()
        want = reference_nms(boxes.tolist(), scores.tolist(), groups.tolist(), thr, mode, offset)
        assert got == want, (trial, n, thr)


def test_batched_nms_long_chains_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # A row of boxes each overlapping its neighbours, scores decreasing along the row: greedy
    # keeps every other box; small blocks force the cross-block path, small chunks the chunking.
    n = 300
    x = torch.arange(n, dtype=torch.float32) * 4
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)
    boxes = torch.cat([boxes, boxes])
    scores = torch.cat([torch.linspace(1, 0.5, n), torch.linspace(0.9, 0.4, n)])
    groups = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    want = reference_nms(boxes.tolist(), scores.tolist(), groups.tolist(), 0.3)
    assert batched_nms(boxes, scores, groups, 0.3).tolist() == want
    monkeypatch.setattr(detector_mod, "_NMS_BLOCK_ELEMS", 1000)
    monkeypatch.setattr(detector_mod, "_greedy", functools.partial(detector_mod._greedy, block=7))
    assert batched_nms(boxes, scores, groups, 0.3).tolist() == want


# ----------------------------------------------------------------------------------- drawing
def test_draw_boxes_outline_only() -> None:
    frames = torch.randint(0, 200, (2, 40, 50, 3), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    before = frames.clone()
    boxes = [torch.tensor([[10.0, 5.0, 30.0, 25.0, 0.99]]), torch.zeros(0, 5)]
    out = draw_boxes(frames, boxes, color=(255, 0, 255), thickness=2)
    assert torch.equal(frames, before)  # a copy, input untouched
    assert out.shape == frames.shape and out.dtype == torch.uint8
    color = torch.tensor([255, 0, 255], dtype=torch.uint8)
    f = out[0]
    outline = torch.zeros(40, 50, dtype=torch.bool)
    outline[5:26, 10:31] = True
    outline[7:24, 12:29] = False  # 2-pixel band drawn inward from the corners (inclusive)
    assert (f[outline] == color).all()
    assert torch.equal(f[~outline], before[0][~outline])  # inside and outside unchanged
    assert torch.equal(out[1], before[1])  # frame without boxes untouched


def test_draw_boxes_clamps_to_frame() -> None:
    frames = torch.zeros(1, 20, 20, 3, dtype=torch.uint8)
    out = draw_boxes(frames, [torch.tensor([[-5.0, -5.0, 10.0, 10.0], [30, 30, 40, 40]])],
                     thickness=1)
    green = torch.tensor([0, 255, 0], dtype=torch.uint8)
    assert (out[0, 0, :11] == green).all() and (out[0, :11, 0] == green).all()
    assert (out[0, 10, :11] == green).all() and (out[0, :11, 10] == green).all()
    assert out[0, 11:, 11:].sum() == 0 and out[0, 1:10, 1:10].sum() == 0


def test_draw_on_detections() -> None:
    img = astronaut()[None]
    dets = detector().detect(img)
    out = draw_boxes(img, dets)
    x1, y1, x2, y2 = (round(v) for v in dets[0][0, :4].tolist())
    assert (out[0, y1, x1:x2 + 1] == torch.tensor([0, 255, 0], dtype=torch.uint8)).all()
    assert torch.equal(out[0, y1 + 3:y2 - 2, x1 + 3:x2 - 2], img[0, y1 + 3:y2 - 2, x1 + 3:x2 - 2])


# ------------------------------------------------------------------------------------- speed
def test_speed_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """detect() at 640x480 for B=1 and B=8 on CPU; printed, not asserted."""
    canvas = torch.full((480, 640, 3), 90, dtype=torch.uint8)
    canvas[:, 64:576] = astronaut()[16:496]
    det = detector()
    det.detect(canvas[None])  # warm-up (pyramid cache, allocator)
    lines = []
    for b in (1, 8):
        frames = canvas[None].repeat(b, 1, 1, 1)
        t0 = time.perf_counter()
        out = det.detect(frames)
        dt = time.perf_counter() - t0
        assert [len(o) for o in out] == [1] * b
        lines.append(f"detect 640x480 B={b}: {dt * 1e3:.0f} ms ({dt * 1e3 / b:.0f} ms/frame)")
    with capsys.disabled():
        print("\n[detector CPU, %d threads] " % torch.get_num_threads() + "; ".join(lines))
