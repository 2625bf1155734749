"""The detector's fixed-shape pipeline, and its CUDA graphs.

The dynamic pipeline (``FaceDetector._detect``) keeps exactly the candidates each stage leaves,
which costs a host sync per stage and a few thousand small kernel launches per batch: on a GPU
the host, not the GPU, sets the pace (an H200 spent ~44 ms of host time and ~12 ms of device
time on a batch of 64 640x480 frames). Here every stage works on tables of a fixed size, so a
batch is one chain of kernels with no host sync, which is captured once per (batch bucket,
frame shape) as a CUDA graph and replayed:

1. PNet maps as in the dynamic pipeline; the ``CAND`` best positions of each frame (``topk``),
   NMS 0.5 per (frame, scale) and 0.7 per frame on ``[B, CAND, CAND]`` overlap tables.
2. The survivors of every frame share one flat table of ``RNET_PER_FRAME * B`` rows (the best
   scores first), cropped and run through RNet; NMS 0.7 per frame on ``[B, PER_FRAME,
   PER_FRAME]`` tables sorted by RNet score.
3. Likewise for ONet (``ONET_PER_FRAME * B`` rows), then the final "Min" NMS.

Greedy NMS is solved as the fixed point of ``keep[j] = valid[j] and not any(keep[i] and
sup[i, j] for i < j)`` (unique, and reached after at most as many rounds as the longest
suppression chain), run for ``NMS_ROUNDS`` rounds. The pipeline reports whether every table
held all its candidates and every NMS reached its fixed point; when not (a cluttered frame),
the batch is re-run on the dynamic pipeline, so the result is always the dynamic pipeline's
(up to float rounding and the order of exactly tied scores).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from models.mtcnn_ops import (
    _bbreg,
    _crop_bounds,
    _Integral,
    _normalise,
    _overlap,
    _pnet_boxes,
    _rerec,
)

if TYPE_CHECKING:
    from models.detector import FaceDetector

__all__ = ["FixedPipeline", "fixed_point_nms"]

log = logging.getLogger(__name__)

# Stage-1 candidates per frame before NMS (a 640x480 frame with a face has ~100-300).
CAND = 512
# Mean rows per frame of the flat RNet / ONet input tables (a frame may use more if others
# use fewer); after stage-1 NMS a frame typically keeps 10-100 candidates, after RNet 1-15.
RNET_PER_FRAME = 64
ONET_PER_FRAME = 16
# Most candidates one frame may bring to the RNet and ONet NMS.
PER_FRAME = 64
NMS_ROUNDS = 12
# Graph buckets: the batch is padded to the next power of two up to this, larger batches are
# run in chunks of it.
MAX_GRAPH_BATCH = 128
# Frame shapes that get graphs; frames of other shapes run the same pipeline eagerly, so a
# client cycling through resolutions cannot make the detector capture graph after graph.
MAX_GRAPH_SHAPES = 8


def fixed_point_nms(sup: Tensor, valid: Tensor, rounds: int | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Greedy NMS on score-sorted tables: ``sup [B, K, K]`` (box i overlaps box j too much;
    only ``i < j`` is read), ``valid [B, K]`` -> ``(keep [B, K], converged scalar bool)``."""
    rounds = NMS_ROUNDS if rounds is None else rounds
    k = sup.shape[-1]
    sup = sup & torch.ones(k, k, dtype=torch.bool, device=sup.device).triu(1)
    keep = valid
    for _ in range(rounds):
        keep = valid & ~(sup & keep[:, :, None]).any(dim=1)
    nxt = valid & ~(sup & keep[:, :, None]).any(dim=1)
    return nxt, (nxt == keep).all()


def _per_frame(frame: Tensor, score: Tensor, valid: Tensor, frames: int, k: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Lay a flat candidate list out as per-frame tables sorted by decreasing score.

    Returns ``(index [frames, k] into the flat list, valid [frames, k], fits scalar bool)``;
    ``fits`` is false when a frame has more than ``k`` valid candidates. No host sync.
    """
    n = frame.shape[0]
    order = torch.argsort(_valid_first(score, valid), descending=True, stable=True)
    order = order[torch.argsort(frame[order], stable=True)]
    fo = frame[order]
    counts = torch.zeros(frames, dtype=torch.long, device=frame.device)
    counts.index_add_(0, fo, torch.ones_like(fo))
    rank = torch.arange(n, device=frame.device) - (torch.cumsum(counts, 0) - counts)[fo]
    col = rank.clamp(max=k)  # column k is a bin for whatever does not fit
    index = torch.zeros(frames, k + 1, dtype=torch.long, device=frame.device)
    index[fo, col] = order
    ok = torch.zeros(frames, k + 1, dtype=torch.bool, device=frame.device)
    ok[fo, col] = valid[order]
    fits = ~(valid[order] & (rank >= k)).any()
    return index[:, :k], ok[:, :k], fits


def _compact(score: Tensor, valid: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``rows`` best valid entries of a flat table -> ``(index, valid, fits)``."""
    rows = min(rows, score.numel())
    top, index = _valid_first(score, valid).topk(rows)
    return index, top >= 0, valid.sum() <= rows


def _valid_first(score: Tensor, valid: Tensor) -> Tensor:
    """Scores (probabilities, >= 0) with invalid entries set to -1, so they sort last."""
    return torch.where(valid, score, torch.full_like(score, -1.0))


class FixedPipeline:
    """Runs a ``FaceDetector``'s batches on fixed-size tables, optionally as CUDA graphs."""

    def __init__(self, det: FaceDetector, *, graphs: bool) -> None:
        self.det = det
        self.graphs = graphs
        self.fallbacks = 0
        self._captured: dict[tuple[int, int, int], _Graph] = {}
        self._pool: tuple[int, int] | None = None

    # -- the pipeline ---------------------------------------------------------------------
    def run(self, frames: Tensor, n_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Frames ``[B, H, W, 3]`` (only the first ``n_valid``, a device scalar, count) ->
        ``(boxes [B, PER_FRAME, 5] score-sorted, keep [B, PER_FRAME], exact scalar bool)``."""
        det = self.det
        t1, t2, t3 = det.thresholds
        b, h, w, _ = frames.shape
        dev = det.device
        _, window, scale_i = det._pyramid(h, w).tables(dev)
        exact = []

        # Stage 1: the best CAND positions of each frame, NMS in the fixed tables.
        integral, prob, reg = det._pnet_maps(frames)
        real = (torch.arange(b, device=dev) < n_valid)[:, None]
        cand = min(CAND, prob.shape[1])
        s1, i1 = prob.topk(cand, dim=1)
        v1 = (s1 >= t1) & real
        exact.append(((prob >= t1) & real).sum(dim=1).max() <= cand)
        bx = window[i1]  # [B, cand, 4]
        si = scale_i[i1]
        r1 = torch.gather(reg, 1, i1[:, :, None].expand(-1, -1, 4))
        iou = _overlap(bx, bx, "union", 0.0)
        keep, conv = fixed_point_nms((iou > 0.5) & (si[:, :, None] == si[:, None, :]), v1)
        exact.append(conv)
        keep, conv = fixed_point_nms(iou > 0.7, keep)
        exact.append(conv)
        boxes = _pnet_boxes(bx, r1, s1).view(-1, 5)
        frame_of = torch.arange(b, device=dev)[:, None].expand(b, cand).reshape(-1)

        # Stage 2: RNet on one flat table of every frame's survivors.
        idx, v2, fits = _compact(boxes[:, 4], keep.view(-1), RNET_PER_FRAME * b)
        exact.append(fits)
        boxes, f2 = boxes[idx], frame_of[idx]
        reg2, p2, v2 = self._refine(integral, boxes, f2, v2, 24, det.rnet, w, h)
        v2 = v2 & (p2[:, 1] > t2)
        tab, v3, fits = _per_frame(f2, p2[:, 1], v2, b, PER_FRAME)
        exact.append(fits)
        b3 = torch.cat([boxes[:, :4], p2[:, 1:2]], dim=1)[tab]  # [B, K, 5]
        keep, conv = fixed_point_nms(_overlap(b3[..., :4], b3[..., :4], "union", 0.0) > 0.7, v3)
        exact.append(conv)
        b3 = _rerec(_bbreg(b3, reg2[tab])).view(-1, 5)
        frame_of = torch.arange(b, device=dev)[:, None].expand(b, PER_FRAME).reshape(-1)

        # Stage 3: ONet on one flat table, then the final "Min" NMS per frame.
        idx, v4, fits = _compact(b3[:, 4], keep.view(-1), ONET_PER_FRAME * b)
        exact.append(fits)
        boxes, f4 = b3[idx], frame_of[idx]
        reg4, p4, v4 = self._refine(integral, boxes, f4, v4, 48, det.onet, w, h)
        v4 = v4 & (p4[:, 1] > t3)
        b4 = _bbreg(torch.cat([boxes[:, :4], p4[:, 1:2]], dim=1), reg4)
        tab, v5, fits = _per_frame(f4, p4[:, 1], v4, b, PER_FRAME)
        exact.append(fits)
        b5 = b4[tab]
        keep, conv = fixed_point_nms(_overlap(b5[..., :4], b5[..., :4], "min", 1.0) > 0.7, v5)
        exact.append(conv)
        return b5, keep, torch.stack(exact).all()

    @staticmethod
    def _refine(integral: _Integral, boxes: Tensor, frame: Tensor, valid: Tensor, size: int,
                net: torch.nn.Module, w: int, h: int) -> tuple[Tensor, Tensor, Tensor]:
        """``net`` on the crops of every row -> ``(reg, prob, valid)``; a row whose crop is
        empty becomes invalid (its crop is replaced by a 1-pixel one so the table stays dense)."""
        y0, y1, x0, x1 = _crop_bounds(boxes, w, h)
        ok = (y1 > y0) & (x1 > x0)
        zero = torch.zeros_like(y0)
        y0, x0 = torch.where(ok, y0, zero), torch.where(ok, x0, zero)
        y1, x1 = torch.where(ok, y1, zero + 1), torch.where(ok, x1, zero + 1)
        out = net(_normalise(integral.crops(frame, y0, y1, x0, x1, size)))
        return out[0], out[-1], valid & ok

    # -- batches --------------------------------------------------------------------------
    def detect(self, frames: Tensor) -> list[Tensor] | None:
        """Per-frame detections, or None when the batch must go to the dynamic pipeline."""
        b = frames.shape[0]
        if self.graphs and b > MAX_GRAPH_BATCH:
            parts = [self.detect(frames[i:i + MAX_GRAPH_BATCH])
                     for i in range(0, b, MAX_GRAPH_BATCH)]
            if any(p is None for p in parts):
                return None
            return [r for p in parts for r in p]  # type: ignore[union-attr]
        graph = self._graph(frames) if self.graphs else None
        if graph is not None:
            boxes, keep, exact = graph.replay(frames)
        else:
            n = torch.tensor(b, device=frames.device)
            boxes, keep, exact = self.run(frames, n)
        boxes, keep = boxes[:b], keep[:b]
        rank = torch.cumsum(keep, dim=1) - 1
        keep = keep & (rank < self.det.max_faces)
        head = torch.cat([exact.view(1).long(), keep.sum(dim=1)]).tolist()  # the one sync
        if not head[0]:
            self.fallbacks += 1
            return None
        return list(torch.split(boxes[keep], head[1:]))

    def _graph(self, frames: Tensor) -> _Graph | None:
        b, h, w, _ = frames.shape
        bucket = 1 << (b - 1).bit_length()
        key = (bucket, h, w)
        if key not in self._captured:
            shapes = {k[1:] for k in self._captured}
            if (h, w) not in shapes and len(shapes) >= MAX_GRAPH_SHAPES:
                return None
            try:
                self._captured[key] = _Graph(self, (bucket, h, w, 3), frames.device)
            except Exception:  # a driver or torch build that cannot capture: run eagerly
                log.exception("CUDA graph capture failed for batch %d at %dx%d; the detector "
                              "runs the same fixed pipeline without graphs from now on",
                              bucket, w, h)
                self.graphs = False
                return None
        return self._captured[key]


class _Graph:
    """One captured ``FixedPipeline.run`` for a padded batch shape, with its static buffers."""

    def __init__(self, pipe: FixedPipeline, shape: tuple[int, int, int, int],
                 device: torch.device) -> None:
        self.frames = torch.zeros(shape, dtype=torch.uint8, device=device)
        self.n_valid = torch.tensor(shape[0], device=device)
        # The graph reads the pyramid's tables where they were at capture: keep them alive
        # even if the detector's pyramid cache lets this shape go.
        self.pyramid = pipe.det._pyramid(shape[1], shape[2])
        # Warm up on a side stream (cuDNN/cuBLAS handles, allocator), then capture.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                pipe.run(self.frames, self.n_valid)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # Graphs share one memory pool: they never run at once (FaceDetector's lock).
        with torch.cuda.graph(self.graph, pool=pipe._pool):
            self.out = pipe.run(self.frames, self.n_valid)
        pipe._pool = self.graph.pool()

    def replay(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b = frames.shape[0]
        self.frames[:b].copy_(frames)
        self.n_valid.fill_(b)
        self.graph.replay()
        return self.out
