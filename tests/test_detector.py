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

import matplotlib
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


# ------------------------------------------------------------- pipelines, more real pictures
GRACE = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"


@functools.lru_cache(maxsize=None)
def _grace_np() -> np.ndarray:
    """Grace Hopper's portrait (public domain), shipped in the matplotlib wheel."""
    with Image.open(GRACE) as im:
        return np.asarray(im.convert("RGB")).copy()


def scene(seed: int, w: int = 640, h: int = 480) -> np.ndarray:
    """A 640x480 frame the tests make from the two real photos: each pasted at a random size
    and place (sometimes mirrored or darkened) on a textured background."""
    rng = np.random.default_rng(seed)
    out = rng.integers(20, 90, (h, w, 3), dtype=np.uint8)
    out = np.asarray(Image.fromarray(out).resize((w // 8, h // 8)).resize((w, h)))
    out = out.copy()
    photos = (_astronaut_np(), _grace_np())[: 1 + seed % 2]
    span = w // len(photos)  # two photos: one in each half, never overlapping
    for k, photo in enumerate(photos):
        side = int(rng.integers(120, min(300, span)))
        im = Image.fromarray(photo).resize((side, int(side * photo.shape[0] / photo.shape[1])))
        a = np.asarray(im)
        if rng.random() < 0.3:
            a = a[:, ::-1]
        if rng.random() < 0.3:
            a = (a * 0.6).astype(np.uint8)
        ph, pw = min(a.shape[0], h), a.shape[1]
        y = int(rng.integers(0, h - ph + 1))
        x = k * span + int(rng.integers(0, span - pw + 1))
        out[y:y + ph, x:x + pw] = a[:ph]
    return out


def scenes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.stack([scene(seed + i) for i in range(n)]))


def assert_same_detections(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Issue 14's tolerance: the same faces, boxes IoU >= 0.9, scores within 0.01."""
    assert [len(x) for x in a] == [len(x) for x in b]
    for x, y in zip(a, b):
        for p, q in zip(x.cpu(), y.cpu()):
            lt, rb = torch.maximum(p[:2], q[:2]), torch.minimum(p[2:4], q[2:4])
            inter = (rb - lt).clamp(min=0).prod()
            area = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            assert inter / area >= 0.9, (p, q)
            assert abs(float(p[4] - q[4])) <= 0.01, (p, q)


@functools.lru_cache(maxsize=None)
def fixed_detector() -> FaceDetector:
    return FaceDetector("cpu", pipeline="fixed")


def test_grace_hopper_has_one_face() -> None:
    out = detector().detect(torch.from_numpy(_grace_np())[None])
    assert len(out[0]) == 1 and float(out[0][0, 4]) > 0.95
    x1, y1, x2, y2 = out[0][0, :4].tolist()
    assert 150 < (x1 + x2) / 2 < 350 and 100 < (y1 + y2) / 2 < 300, out  # her face, by eye
    assert 100 < x2 - x1 < 250


def test_made_scenes_find_every_pasted_face() -> None:
    frames = scenes(6)
    out = detector().detect(frames)
    # Scenes with an even seed hold the astronaut, odd ones her and Grace Hopper.
    assert [len(o) >= 1 + i % 2 for i, o in enumerate(out)] == [True] * 6, out


def test_fixed_pipeline_matches_dynamic_on_cpu() -> None:
    canvas = torch.full((1, 480, 640, 3), 90, dtype=torch.uint8)
    canvas[0, :, 64:576] = astronaut()[16:496]
    frames = torch.cat([scenes(5, seed=10), torch.zeros(1, 480, 640, 3, dtype=torch.uint8),
                        canvas])
    fixed = FaceDetector("cpu", pipeline="fixed")
    got = fixed.detect(frames)
    want = detector().detect(frames)
    assert fixed.fallbacks == 0
    assert_same_detections(got, want)
    assert sum(len(g) for g in got) >= 6
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=0)


def test_fixed_pipeline_ignores_padding_frames() -> None:
    from models.detector_graph import FixedPipeline
    frames = scenes(4, seed=20)
    det = fixed_detector()
    pipe = FixedPipeline(det, graphs=False)
    with torch.inference_mode():
        padded, keep, exact = pipe.run(frames, torch.tensor(2))
        full, keep_full, _ = pipe.run(frames[:2], torch.tensor(2))
    assert bool(exact)
    assert not keep[2:].any()  # frames past n_valid bring nothing
    assert torch.equal(keep[:2], keep_full)
    torch.testing.assert_close(padded[:2][keep[:2]], full[keep_full])


def test_fixed_pipeline_falls_back_when_tables_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.detector_graph as graph_mod
    frames = scenes(3, seed=30)
    want = detector().detect(frames)
    for name, value in (("CAND", 4), ("RNET_PER_FRAME", 1), ("PER_FRAME", 1), ("NMS_ROUNDS", 0)):
        with monkeypatch.context() as m:
            m.setattr(graph_mod, name, value)
            det = FaceDetector("cpu", pipeline="fixed")
            got = det.detect(frames)
            assert det.fallbacks == 1, name
            assert_same_detections(got, want)


def test_fixed_point_nms_matches_reference() -> None:
    from models.detector_graph import fixed_point_nms
    g = torch.Generator().manual_seed(1)
    for trial in range(10):
        n = int(torch.randint(1, 120, (1,), generator=g))
        xy = torch.rand(2, n, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + torch.rand(2, n, 2, generator=g) * 40 + 2], dim=2)
        scores = torch.rand(2, n, generator=g).sort(dim=1, descending=True).values
        valid = torch.rand(2, n, generator=g) > 0.2
        thr = [0.3, 0.5, 0.7][trial % 3]
        sup = detector_mod._overlap(boxes, boxes, "union", 0.0) > thr
        keep, converged = fixed_point_nms(sup, valid, rounds=n)
        assert bool(converged)
        for f in range(2):
            idx = valid[f].nonzero().flatten().tolist()
            want = reference_nms(boxes[f, idx].tolist(), scores[f, idx].tolist(), [0] * len(idx),
                                 thr)
            assert keep[f].nonzero().flatten().tolist() == sorted(idx[i] for i in want)


def test_min_face_size_trades_small_faces_for_speed() -> None:
    small = torch.full((1, 480, 640, 3), 60, dtype=torch.uint8)
    face = np.array(Image.fromarray(_astronaut_np()).resize((160, 160)))  # face ~30 px wide
    small[0, 100:260, 100:260] = torch.from_numpy(face)
    big = scenes(1, seed=0)
    coarse = FaceDetector("cpu", min_face_size=80)
    assert len(detector().detect(small)[0]) == 1
    assert len(coarse.detect(small)[0]) == 0  # smaller than min_face_size: not looked for
    assert_same_detections(coarse.detect(big), detector().detect(big))
    assert len(coarse._pyramid(480, 640).scales) < len(detector()._pyramid(480, 640).scales)


def test_draw_boxes_matches_a_per_box_reference() -> None:
    g = torch.Generator().manual_seed(2)
    frames = torch.randint(0, 255, (4, 37, 53, 3), generator=g, dtype=torch.uint8)
    boxes = [torch.rand(int(torch.randint(0, 6, (1,), generator=g)), 5, generator=g) * 80 - 15
             for _ in range(4)]
    boxes[0] = torch.cat([boxes[0], torch.tensor([[float("nan"), 1, 5, 5, 1],
                                                 [40, 30, 2, 3, 1], [-9, -9, -2, -3, 1]])])
    color, t = torch.tensor([255, 0, 255], dtype=torch.uint8), 2
    want = frames.clone()
    for i, bx in enumerate(boxes):
        for x1, y1, x2, y2 in bx[:, :4].round().tolist():
            x1, x2 = sorted((x1, x2))
            y1, y2 = sorted((y1, y2))
            if not all(map(np.isfinite, (x1, y1, x2, y2))) or x2 < 0 or y2 < 0 \
                    or x1 > 52 or y1 > 36:
                continue
            xa, xb, ya, yb = max(int(x1), 0), min(int(x2), 52) + 1, max(int(y1), 0), min(int(y2), 36) + 1
            img = want[i]
            img[ya:min(ya + t, yb), xa:xb] = color
            img[max(yb - t, ya):yb, xa:xb] = color
            img[ya:yb, xa:min(xa + t, xb)] = color
            img[ya:yb, max(xb - t, xa):xb] = color
    assert torch.equal(draw_boxes(frames, boxes, color=(255, 0, 255), thickness=t), want)
    # The GPU's batched drawing, run here on the CPU, draws the same pixels.
    assert torch.equal(detector_mod._draw_masked(frames, boxes, (255, 0, 255), t), want)


# ---------------------------------------------------------------------------- CUDA graphs
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_graph_pipeline_matches_dynamic_on_cuda() -> None:
    graphed = FaceDetector("cuda")
    assert graphed.pipeline == "graph"
    dynamic = FaceDetector("cuda", pipeline="dynamic")
    cpu = detector()
    for n in (1, 3, 8, 5, 8):  # 3 and 5 are padded into the 4 and 8 buckets; 8 replays twice
        frames = scenes(n, seed=40 + n).cuda()
        got = graphed.detect(frames)
        assert all(g.is_cuda for g in got)
        assert_same_detections(got, dynamic.detect(frames))
        assert_same_detections(got, cpu.detect(frames.cpu()))
    assert graphed.fallbacks == 0
    assert sorted(k[0] for k in graphed._fixed._captured) == [1, 4, 8]


@cuda
def test_graph_pipeline_large_batch_is_chunked_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.detector_graph as graph_mod
    monkeypatch.setattr(graph_mod, "MAX_GRAPH_BATCH", 4)
    frames = scenes(10, seed=60).cuda()
    graphed = FaceDetector("cuda")
    assert_same_detections(graphed.detect(frames), detector().detect(frames.cpu()))
    assert max(k[0] for k in graphed._fixed._captured) == 4


def test_cpu_chunks_give_the_batch_result(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = scenes(5, seed=70)
    whole = detector().detect(frames)
    monkeypatch.setattr(detector_mod, "_CPU_CHUNK", 2)
    chunked = detector().detect(frames)
    assert len(chunked) == 5
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


def test_pyramid_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detector_mod, "_PYRAMID_CACHE", 3)
    det = FaceDetector("cpu")
    for side in range(40, 50):  # a client cycling through frame shapes
        det.detect(torch.zeros(1, side, side + 1, 3, dtype=torch.uint8))
    assert len(det._pyramids) == 3
    assert list(det._pyramids) == [(47, 48), (48, 49), (49, 50)]  # the most recent ones
    det._pyramid(47, 48)
    assert list(det._pyramids)[-1] == (47, 48)  # used again: most recent


@cuda
def test_graph_shapes_are_bounded_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.detector_graph as graph_mod
    monkeypatch.setattr(graph_mod, "MAX_GRAPH_SHAPES", 2)
    graphed = FaceDetector("cuda")
    for h, w in ((120, 160), (240, 320), (480, 640), (240, 320)):
        frames = torch.from_numpy(np.stack([scene(1, w, h)])).cuda()
        assert_same_detections(graphed.detect(frames), detector().detect(frames.cpu()))
    assert {k[1:] for k in graphed._fixed._captured} == {(120, 160), (240, 320)}


# ------------------------------------------------------------------ the CPU path's rewrites
def test_folded_pnet_matches_pnet() -> None:
    """Normalisation folded into conv1's bias and the softmax head as one logit difference:
    the same probabilities and regressions as PNet on normalised input."""
    det = detector()
    x = torch.randint(0, 256, (2, 3, 37, 53)).float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        reg, prob = det.pnet((x - 127.5) * 0.0078125)
        out = det._pnet_maps_net(x * 0.0078125)  # [B, h, w, 5]
    torch.testing.assert_close(torch.sigmoid(out[..., 0]), prob[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., 1:], reg.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 10, 22, 22), (2, 16, 21, 9), (1, 4, 1, 1)])
def test_prelu_and_pool_rewrites_are_exact(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    weight = torch.randn(shape[1])  # negative slopes too, as in MTCNN's weights
    ours = detector_mod.PReLU(shape[1])
    ours.weight.data.copy_(weight)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        assert torch.equal(ours(xl), torch.nn.functional.prelu(x, weight))
        pooled = detector_mod._max_pool_2x2(xl)
        assert torch.equal(pooled, torch.nn.functional.max_pool2d(x, 2, 2, ceil_mode=True))
        assert pooled.is_contiguous(memory_format=layout)


_FAULTS_SCRIPT = """
import resource, sys
import numpy as np, torch
from PIL import Image
from models.detector import FaceDetector
from models.device import keep_freed_memory
det = FaceDetector("cpu")  # a CPU detector applies the setting unless BATCHRTC_KEEP_HEAP=0
print(keep_freed_memory())
img = np.asarray(Image.open(sys.argv[1]).convert("RGB").resize((640, 480)))
frames = torch.from_numpy(np.stack([img] * 8))
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    det.detect(frames)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The fewest of the last five: a kept heap still grows now and then (fragmentation) but
# settles at no faults, while glibc's default faults every batch in again.
print(min(faults[3:]))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_stops_refaulting_large_blocks() -> None:
    """A CPU batch loop settles at no page faults once the heap keeps freed blocks; with
    glibc's defaults (BATCHRTC_KEEP_HEAP=0) every batch of 8 faults thousands of pages in."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    results = {}
    for keep in ("1", "0"):
        env = {**os.environ, "BATCHRTC_KEEP_HEAP": keep, "PYTHONPATH": str(root)}
        cmd = [sys.executable, "-c", _FAULTS_SCRIPT, str(FIXTURE)]
        out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True,
                             timeout=120).stdout.split()
        results[keep] = (out[0], int(out[1]))
    assert results["1"][0] == "True" and results["0"][0] == "False"
    # The control: glibc refaults every batch (15,000 pages alone, as few as ~4,500 in the
    # full suite: its dynamic mmap threshold depends on what the process allocated before).
    assert results["0"][1] > 1_000, results
    assert results["1"][1] < 100, results
