"""Batched MTCNN face detector in plain torch (no torchvision), for a batch of video frames.

The three networks (PNet / RNet / ONet) are re-implemented here and load the pretrained state
dicts that ship in the ``facenet-pytorch`` wheel (``facenet_pytorch/data/{p,r,o}net.pt``). The
package is located with ``importlib.util.find_spec`` and never imported: its ``__init__`` pulls
in torchvision. Install it without its (old, pinned) dependencies::

    pip install --no-deps facenet-pytorch==2.6.0

The pipeline follows ``facenet_pytorch.models.utils.detect_face.detect_face`` (the reference
most people know), restated for a batch that stays together through every stage:

1. Image pyramid: scales ``12/min_face_size * factor**k`` while the short side stays >= 12
   (computed once per frame shape). For each scale the whole batch is resized with
   ``interpolate(mode="area")`` to ``(int(h*s+1), int(w*s+1))`` and run through PNet.
2. The score maps of all scales are flattened and concatenated so one ``nonzero`` yields every
   candidate of every frame and scale; each candidate carries its frame index. NMS (IoU 0.5)
   runs per (frame, scale) and then (IoU 0.7) per frame across scales, both as one batched call.
   PNet's regression is applied, boxes are squared (``rerec``).
3. RNet on 24x24 crops of all candidates of all frames at once, score > thresholds[1], NMS 0.7
   per frame, regression (``bbreg``), ``rerec``.
4. ONet on 48x48 crops, score > thresholds[2], ``bbreg``, NMS 0.7 per frame with the "Min"
   overlap (intersection over the smaller area), as facenet-pytorch does.

Crops follow facenet-pytorch's ``pad``: box corners are truncated to ints and clamped to the
image (no zero padding), the crop is pixels ``[y1-1, y2) x [x1-1, x2)`` and is resized with
area interpolation. Here that area resize is done for every crop at once from an integral image
of the batch (exactly ``adaptive_avg_pool2d``'s bins, which is what ``interpolate(mode="area")``
is), instead of a Python loop of per-crop ``interpolate`` calls. Unlike facenet-pytorch, a box
whose clamped crop is empty is dropped (the reference silently misaligns crops and boxes then).

Everything is device-agnostic float32 torch; the host syncs are a handful of ``nonzero`` /
size reads per call, independent of the batch size.
"""
from __future__ import annotations

import importlib.util
import math
import os
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.device import default_device, keep_freed_memory
from models.mtcnn_ops import (
    _area_bins,
    _bbreg,
    _crop_bounds,
    _Integral,
    _normalise,
    _overlap,
    _pnet_boxes,
    _rerec,
)

__all__ = ["FaceDetector", "PNet", "RNet", "ONet", "batched_nms", "draw_boxes", "weights_dir"]

_INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.6.0"
# Elements of one [groups, M, M] overlap block in batched_nms; bounds its memory.
_NMS_BLOCK_ELEMS = 1 << 24
# Crops per RNet/ONet forward call; bounds activation memory for huge candidate sets.
_NET_CHUNK = 4096
# Frames per dynamic-pipeline pass on a CPU (see FaceDetector.detect).
_CPU_CHUNK = 8
# Frame shapes whose pyramid tables are kept.
_PYRAMID_CACHE = 32


def weights_dir() -> str:
    """The ``data`` folder of the installed facenet-pytorch package (without importing it)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "MTCNN weights not found: the facenet-pytorch wheel is not installed. "
            f"Install it with `{_INSTALL_HINT}` (its own dependencies are not needed)."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data")
    missing = [n for n in ("pnet.pt", "rnet.pt", "onet.pt")
               if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise FileNotFoundError(
            f"MTCNN weights {missing} missing from {path}; reinstall with `{_INSTALL_HINT}`."
        )
    return path


def _load_state(name: str) -> dict[str, Tensor]:
    return torch.load(os.path.join(weights_dir(), f"{name}.pt"), map_location="cpu",
                      weights_only=True)


# ------------------------------------------------------------------------------------ networks
class PReLU(nn.PReLU):
    """``nn.PReLU`` (same weights, same values) that runs a channels-last map as a 2-D
    ``[N*H*W, C]`` view: torch's kernel is ~2.4x faster on that layout than on the 4-D
    channels-last one on CPU (the nets' activations are channels-last throughout)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            n, c, h, w = x.shape
            y = F.prelu(x.permute(0, 2, 3, 1).reshape(-1, c), self.weight)
            return y.view(n, h, w, c).permute(0, 3, 1, 2)
        return F.prelu(x, self.weight)


def _max_pool_2x2(x: Tensor) -> Tensor:
    """``max_pool2d(x, 2, 2, ceil_mode=True)``; on CPU as three maxima of strided views (an
    odd edge padded with -inf), ~3x faster than the channels-last pooling kernel there."""
    if x.device.type != "cpu":
        return F.max_pool2d(x, 2, 2, ceil_mode=True)
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf"))
    rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    return torch.maximum(rows[:, :, :, 0::2], rows[:, :, :, 1::2])


class PNet(nn.Module):
    """Proposal net: fully convolutional, 12x12 receptive field, stride 2.

    Returns ``(reg [B,4,h,w], prob [B,2,h,w])`` (softmax over face/non-face).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = PReLU(10)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.prelu1(self.conv1(x))
        x = _max_pool_2x2(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class _PNetMaps(nn.Module):
    """PNet with its input normalisation and both heads folded into its convolutions, for
    whole-pyramid use (same function as ``PNet``, fewer passes over the large maps).

    Takes ``x / 128`` (not ``(x - 127.5) / 128``: the offset is folded into conv1's bias, which
    is exact because conv1 has no padding) and returns ``[B, h, w, 5]``: the face logit minus
    the non-face logit (``sigmoid`` of it is ``softmax(...)[:, 1]``), then the four box
    regressions. The two 1x1 heads are one conv, and the output stays channels-last, so the
    levels concatenate without a transpose.
    """

    def __init__(self, pnet: PNet) -> None:
        super().__init__()
        w1, b1 = pnet.conv1.weight, pnet.conv1.bias
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.conv1.weight.data.copy_(w1)
        self.conv1.bias.data.copy_(b1 - (127.5 / 128.0) * w1.sum(dim=(1, 2, 3)))
        self.prelu1, self.conv2, self.prelu2 = pnet.prelu1, pnet.conv2, pnet.prelu2
        self.conv3, self.prelu3 = pnet.conv3, pnet.prelu3
        w41, b41 = pnet.conv4_1.weight, pnet.conv4_1.bias
        self.head = nn.Conv2d(32, 5, kernel_size=1)
        self.head.weight.data.copy_(torch.cat([w41[1:2] - w41[0:1], pnet.conv4_2.weight]))
        self.head.bias.data.copy_(torch.cat([b41[1:2] - b41[0:1], pnet.conv4_2.bias]))
        self.to(device=w1.device, memory_format=torch.channels_last).requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu1(self.conv1(x))
        x = _max_pool_2x2(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.head(x).permute(0, 2, 3, 1)


class RNet(nn.Module):
    """Refine net on 24x24 crops. Returns ``(reg [N,4], prob [N,2])``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = PReLU(28)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = PReLU(48)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.prelu1(self.conv1(x))
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        x = self.prelu2(self.conv2(x))
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        # The weights come from a (W, H, C)-ordered framework: flatten in that order.
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net on 48x48 crops. Returns ``(reg [N,4], landmarks [N,10], prob [N,2])``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = PReLU(32)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = PReLU(64)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = PReLU(64)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.prelu1(self.conv1(x))
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        x = self.prelu2(self.conv2(x))
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        x = _max_pool_2x2(x)
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


# ---------------------------------------------------------------------------------------- NMS
def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *,
                mode: str = "union", offset: float = 0.0) -> Tensor:
    """Greedy NMS done independently for each value of ``idxs`` (e.g. a frame index).

    Same contract as ``torchvision.ops.batched_nms``: returns the indices of the kept boxes in
    decreasing score order; a box is dropped when its overlap with a kept, higher-scoring box of
    the same group is ``> iou_threshold``. ``mode="min"`` divides the intersection by the smaller
    area instead of the union; ``offset=1`` uses the inclusive-pixel convention ``x2 - x1 + 1``.

    Vectorised over groups: boxes are sorted by (group, score) and padded to ``[G, M, 4]``, so
    each group's ``M x M`` overlap matrix is computed in one shot and groups never see each
    other (no coordinate offsets, hence no float precision issue). Groups are processed largest
    first in chunks of similar size to bound memory and padding. See ``_greedy`` for the
    exact greedy pass.
    """
    n = boxes.shape[0]
    device = boxes.device
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    boxes = boxes.float()
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(idxs[order], stable=True)]
    _, gid, counts = torch.unique_consecutive(idxs[order], return_inverse=True,
                                              return_counts=True)
    # Re-sort groups by decreasing size (stable, so scores stay sorted within each group).
    by_size = torch.argsort(counts, descending=True, stable=True)
    pos = torch.empty_like(by_size)
    pos[by_size] = torch.arange(by_size.numel(), device=device)
    gpos = pos[gid]
    resort = torch.argsort(gpos, stable=True)
    order, gpos = order[resort], gpos[resort]
    counts_sorted = counts[by_size]
    starts = torch.cumsum(counts_sorted, 0) - counts_sorted
    rank = torch.arange(n, device=device) - starts[gpos]
    sizes = counts_sorted.tolist()  # host sync: chunking needs the sizes
    first = [0]
    for c in sizes:
        first.append(first[-1] + c)

    keep = torch.zeros(n, dtype=torch.bool, device=device)
    g0 = 0
    while g0 < len(sizes):
        m = sizes[g0]
        g1 = min(len(sizes), g0 + max(1, _NMS_BLOCK_ELEMS // (m * m)))
        a, b = first[g0], first[g1]
        lg, lr = gpos[a:b] - g0, rank[a:b]
        padded = boxes.new_zeros(g1 - g0, m, 4)
        padded[lg, lr] = boxes[order[a:b]]
        valid = torch.zeros(g1 - g0, m, dtype=torch.bool, device=device)
        valid[lg, lr] = True
        sup = (_overlap(padded, padded, mode, offset) > iou_threshold)
        sup &= valid[:, :, None] & valid[:, None, :]
        keep[a:b] = _greedy(sup, valid)[lg, lr]
        g0 = g1
    kept = torch.sort(order[keep]).values  # ties in score: lower index first, like a stable sort
    return kept[torch.argsort(scores[kept], descending=True, stable=True)]


def _greedy(sup: Tensor, valid: Tensor, block: int = 128) -> Tensor:
    """Exact greedy NMS for score-sorted groups: ``sup [G, M, M]`` (i overlaps j too much),
    ``valid [G, M]`` -> keep ``[G, M]``.

    Greedy NMS is the unique solution of ``keep[j] = valid[j] and not any(keep[i] and
    sup[i, j] for i < j)``. The boxes are taken in blocks of ``block`` (in score order): boxes
    suppressed by the final kept boxes of earlier blocks are removed with one reduction, then
    the block's own recurrence is solved by iterating it from "all kept" until it stops
    changing (after t rounds the block's first t entries are final, so at most ``block``
    rounds; in practice a few). Only the pairs ``i < j`` of ``sup`` (strict upper triangle)
    are used.
    """
    g, m, _ = sup.shape
    keep = torch.zeros_like(valid)
    tri = torch.ones(min(block, m), min(block, m), dtype=torch.bool, device=sup.device).triu(1)
    for s in range(0, m, block):
        e = min(m, s + block)
        cand = valid[:, s:e]
        if s:
            cand = cand & ~(sup[:, :s, s:e] & keep[:, :s, None]).any(dim=1)
        inner = sup[:, s:e, s:e] & tri[: e - s, : e - s] & cand[:, :, None]
        k = cand
        for _ in range(e - s):
            new = cand & ~(inner & k[:, :, None]).any(dim=1)
            if torch.equal(new, k):
                break
            k = new
        keep[:, s:e] = k
    return keep


# ---------------------------------------------------------------------------------- detector
def _pnet_out(n: int) -> int:
    """PNet's output length for an input length (3x3 conv, 2x2 ceil pool, two 3x3 convs)."""
    return (n - 2 + 1) // 2 - 4


class _Pyramid:
    """Per frame shape: the scales, each level's area bins, and every PNet output position's
    window box and scale index (all levels concatenated, frame-independent)."""

    def __init__(self, h: int, w: int, min_face_size: int, factor: float) -> None:
        m = 12.0 / min_face_size
        minl = min(h, w) * m
        self.h, self.w = h, w
        self.scales: list[float] = []
        s = m
        while minl >= 12:
            self.scales.append(s)
            s *= factor
            minl *= factor
        self.sizes = [(int(h * s + 1), int(w * s + 1)) for s in self.scales]
        self.out_sizes = [(_pnet_out(sh), _pnet_out(sw)) for sh, sw in self.sizes]
        self._dev: dict[torch.device, tuple[tuple[Tensor, Tensor], Tensor, Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[tuple[Tensor, Tensor], Tensor, Tensor]:
        """(``(corners [4, N], scale [N])`` for ``_Integral.pyramid`` (scale: 1 / (128 * bin
        area), PNet's input), window boxes ``[P, 4]``, scale index ``[P]``), cached per device."""
        if device not in self._dev:
            wp = self.w + 1
            chan = torch.arange(3)
            corners, scale = [], []
            for sh, sw in self.sizes:
                ys, ye = (v[0] for v in _area_bins(torch.zeros(1, dtype=torch.long),
                                                   torch.tensor([self.h]), sh))
                xs, xe = (v[0] for v in _area_bins(torch.zeros(1, dtype=torch.long),
                                                   torch.tensor([self.w]), sw))

                def flat(r: Tensor, c: Tensor) -> Tensor:
                    return ((r[:, None, None] * wp + c[None, :, None]) * 3 + chan).reshape(-1)

                corners.append(torch.stack([flat(ye, xe), flat(ye, xs), flat(ys, xe),
                                            flat(ys, xs)]))
                area = ((ye - ys)[:, None] * (xe - xs)[None, :]).to(torch.float32)
                # 1/128: PNet's input scaling (`_PNetMaps` takes x / 128, its offset folded in).
                scale.append((0.0078125 / area)[:, :, None].expand(sh, sw, 3).reshape(-1))
            boxes, index = [], []
            for k, ((oh, ow), s) in enumerate(zip(self.out_sizes, self.scales)):
                yy, xx = torch.meshgrid(torch.arange(oh), torch.arange(ow), indexing="ij")
                x, y = xx.reshape(-1).float(), yy.reshape(-1).float()
                boxes.append(torch.stack([torch.floor((2 * x + 1) / s), torch.floor((2 * y + 1) / s),
                                          torch.floor((2 * x + 12) / s),
                                          torch.floor((2 * y + 12) / s)], dim=1))
                index.append(torch.full((oh * ow,), k, dtype=torch.long))
            self._dev[device] = ((torch.cat(corners, 1).to(device), torch.cat(scale).to(device)),
                                 torch.cat(boxes).to(device), torch.cat(index).to(device))
        return self._dev[device]


PIPELINES = ("auto", "dynamic", "fixed", "graph")


class FaceDetector:
    """Batched MTCNN face detector (facenet-pytorch's algorithm and weights, own torch code).

    ``min_face_size`` (pixels, default 40) is the speed knob: the first pyramid level scales a
    frame by ``12 / min_face_size``, and PNet's cost goes with that level's area, so doubling it
    makes stage 1 about four times cheaper and misses faces smaller than it.

    ``pipeline`` picks how a batch runs: ``"dynamic"`` (candidate lists of whatever size each
    stage leaves; host syncs between stages; the CPU default), ``"fixed"`` (every stage on
    fixed-size candidate tables, no host sync until the end; see ``models.detector_graph``),
    ``"graph"`` (the fixed pipeline captured as one CUDA graph per batch-size bucket and frame
    shape; the CUDA default). A batch whose candidates overflow the fixed tables is re-run on
    the dynamic pipeline, so all three give the same detections.
    """

    def __init__(self, device: torch.device | str | None = None, *, min_face_size: int = 40,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), factor: float = 0.709,
                 max_faces: int = 32, pipeline: str = "auto") -> None:
        if device is None:
            device = default_device()
        if min_face_size < 12:
            raise ValueError("min_face_size must be >= 12 (PNet's window)")
        if not 0.0 < factor < 1.0:
            raise ValueError("factor must be in (0, 1)")
        if len(thresholds) != 3:
            raise ValueError("thresholds must have three values (PNet, RNet, ONet)")
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        if pipeline == "auto":
            pipeline = "graph" if self.device.type == "cuda" else "dynamic"
        if pipeline == "graph" and self.device.type != "cuda":
            raise ValueError("pipeline='graph' needs a CUDA device")
        self.pipeline = pipeline
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.max_faces = int(max_faces)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for net, name in ((self.pnet, "pnet"), (self.rnet, "rnet"), (self.onet, "onet")):
            net.load_state_dict(_load_state(name))
            net.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
            # Inputs arrive channels-last (views of [B, H, W, 3] frames): keep the weights so.
            net.to(memory_format=torch.channels_last)
        self._pnet_maps_net = _PNetMaps(self.pnet)
        self._pyramids: dict[tuple[int, int], _Pyramid] = {}
        self._fixed = None
        if pipeline != "dynamic":
            from models.detector_graph import FixedPipeline
            self._fixed = FixedPipeline(self, graphs=pipeline == "graph")
        # The fixed pipeline's graphs own their input/output buffers: one batch at a time.
        self._lock = threading.Lock()

    @property
    def fallbacks(self) -> int:
        """Batches the fixed pipeline handed to the dynamic one (candidate tables overflowed)."""
        return self._fixed.fallbacks if self._fixed is not None else 0

    def _pyramid(self, h: int, w: int) -> _Pyramid:
        """The frame shape's pyramid, from a small LRU cache (clients choose frame shapes)."""
        key = (h, w)
        pyr = self._pyramids.pop(key, None)
        if pyr is None:
            pyr = _Pyramid(h, w, self.min_face_size, self.factor)
            while len(self._pyramids) >= _PYRAMID_CACHE:
                self._pyramids.pop(next(iter(self._pyramids)))
        self._pyramids[key] = pyr  # most recently used last
        return pyr

    @torch.inference_mode()
    def detect(self, frames: Tensor) -> list[Tensor]:
        """Faces in each frame of ``frames`` (uint8 ``[B, H, W, 3]`` RGB).

        Returns one float32 tensor ``[N_i, 5]`` (x1, y1, x2, y2, score) per frame, sorted by
        decreasing score, at most ``max_faces`` rows, on the frames' device.
        """
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [B, H, W, 3], got {tuple(frames.shape)}")
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        out_device = frames.device
        frames = frames.to(self.device)
        b, h, w, _ = frames.shape
        if b == 0:
            return []
        with self._lock:  # also guards the pyramid cache, which every stage reads
            if not self._pyramid(h, w).scales:  # frames smaller than min_face_size
                return [torch.zeros(0, 5, device=out_device) for _ in range(b)]
            if self._fixed is not None:
                result = self._fixed.detect(frames)
                if result is not None:
                    return [r.to(out_device) for r in result]
            # On a CPU a batch gains nothing past a few frames and large ones fall out of the
            # caches (32 frames: 30 frames/s vs 52 for 8), so it runs in chunks.
            step = _CPU_CHUNK if self.device.type == "cpu" else b
            out = []
            for i in range(0, b, step):
                boxes, fidx = self._detect(frames[i:i + step])
                out += self._split(boxes, fidx, min(step, b - i))
            return [r.to(out_device) for r in out]

    # -- stages ---------------------------------------------------------------------------
    def _pnet_maps(self, frames: Tensor) -> tuple[_Integral, Tensor, Tensor]:
        """Stage 1 for every frame and level: ``(integral, prob [B, P], reg [B, P, 4])``."""
        b, h, w, _ = frames.shape
        pyr = self._pyramid(h, w)
        (corners, scale), _, _ = pyr.tables(self.device)
        integral = _Integral(frames)
        maps = [self._pnet_maps_net(level).reshape(b, -1, 5)
                for level in integral.pyramid(corners, scale, pyr.sizes)]
        out = torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]
        return integral, torch.sigmoid(out[..., 0]), out[..., 1:]

    def _detect(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """The dynamic pipeline -> ``(boxes [N, 5], frame index [N])``."""
        b, h, w, _ = frames.shape
        dev = self.device
        empty = (torch.zeros(0, 5, device=dev), torch.zeros(0, dtype=torch.long, device=dev))
        t1, t2, t3 = self.thresholds
        pyr = self._pyramid(h, w)
        _, window, scale_i = pyr.tables(dev)

        # Stage 1: PNet over the pyramid; candidates of every frame and scale in one list.
        integral, prob, reg = self._pnet_maps(frames)
        fi, pi = (prob >= t1).nonzero(as_tuple=True)
        if fi.numel() == 0:
            return empty
        score = prob[fi, pi]
        bx = window[pi]
        r = reg[fi, pi]  # [N, 4]
        # NMS within each (frame, scale), then within each frame across scales.
        keep = batched_nms(bx, score, fi * len(pyr.scales) + scale_i[pi], 0.5)
        bx, score, r, fi = bx[keep], score[keep], r[keep], fi[keep]
        keep = batched_nms(bx, score, fi, 0.7)
        boxes = _pnet_boxes(bx[keep], r[keep], score[keep])
        fi = fi[keep]

        # Stage 2: RNet on 24x24 crops of every candidate of every frame.
        boxes, fi, out = self._refine(integral, boxes, fi, 24, self.rnet, w, h)
        if fi.numel() == 0:
            return empty
        reg, prob = out
        ok = prob[:, 1] > t2
        boxes = torch.cat([boxes[ok, :4], prob[ok, 1:2]], dim=1)
        fi, reg = fi[ok], reg[ok]
        keep = batched_nms(boxes[:, :4], boxes[:, 4], fi, 0.7)
        boxes = _rerec(_bbreg(boxes[keep], reg[keep]))
        fi = fi[keep]

        # Stage 3: ONet on 48x48 crops.
        boxes, fi, out = self._refine(integral, boxes, fi, 48, self.onet, w, h)
        if fi.numel() == 0:
            return empty
        reg, _landmarks, prob = out
        ok = prob[:, 1] > t3
        boxes = torch.cat([boxes[ok, :4], prob[ok, 1:2]], dim=1)
        fi, reg = fi[ok], reg[ok]
        boxes = _bbreg(boxes, reg)
        keep = batched_nms(boxes[:, :4], boxes[:, 4], fi, 0.7, mode="min", offset=1.0)
        return boxes[keep], fi[keep]

    def _refine(self, integral: _Integral, boxes: Tensor, fi: Tensor, size: int, net: nn.Module,
                w: int, h: int) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Crop all boxes (all frames) at ``size`` and run ``net`` on them in one batch."""
        y0, y1, x0, x1 = _crop_bounds(boxes, w, h)
        ok = (y1 > y0) & (x1 > x0)
        if not bool(ok.all()):
            boxes, fi, y0, y1, x0, x1 = boxes[ok], fi[ok], y0[ok], y1[ok], x0[ok], x1[ok]
        if fi.numel() == 0:
            return boxes, fi, ()
        outs = []
        for c in range(0, fi.numel(), _NET_CHUNK):
            sl = slice(c, c + _NET_CHUNK)
            crops = integral.crops(fi[sl], y0[sl], y1[sl], x0[sl], x1[sl], size)
            outs.append(net(_normalise(crops)))
        return boxes, fi, tuple(torch.cat(parts, dim=0) for parts in zip(*outs))

    def _split(self, boxes: Tensor, fi: Tensor, b: int) -> list[Tensor]:
        """Per-frame lists, each score-sorted and capped at ``max_faces``."""
        if fi.numel() == 0:
            return [boxes.new_zeros(0, 5) for _ in range(b)]
        order = torch.argsort(boxes[:, 4], descending=True, stable=True)
        order = order[torch.argsort(fi[order], stable=True)]
        boxes, fi = boxes[order], fi[order]
        counts = torch.bincount(fi, minlength=b)
        rank = torch.arange(fi.numel(), device=fi.device) - (torch.cumsum(counts, 0) - counts)[fi]
        keep = rank < self.max_faces
        boxes = boxes[keep]
        counts = counts.clamp(max=self.max_faces)
        return list(torch.split(boxes, counts.tolist()))


# ------------------------------------------------------------------------------------ drawing
def draw_boxes(frames: Tensor, boxes: Sequence[Tensor], color: Sequence[int] = (0, 255, 0),
               thickness: int = 3) -> Tensor:
    """A copy of ``frames`` (uint8 ``[B, H, W, 3]``) with box outlines drawn.

    ``boxes[i]`` is ``[N_i, >=4]`` (x1, y1, x2, y2, ...) for frame ``i``. Corners are rounded to
    pixels and clamped to the frame; the outline is ``thickness`` pixels drawn inward from the
    box edges (both corners inclusive). Boxes entirely outside the frame are skipped.

    On a GPU the whole batch is drawn with a fixed number of kernels (``_draw_masked``); on a
    CPU four slice assignments per box are far cheaper (0.8 ms vs 18 ms for 8 640x480 frames
    with a face each, this repo's 2-core box) and launch nothing.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [B, H, W, 3], got {tuple(frames.shape)}")
    if len(boxes) != frames.shape[0]:
        raise ValueError(f"got {len(boxes)} box lists for {frames.shape[0]} frames")
    t = max(1, int(thickness))
    if sum(int(bx.shape[0]) for bx in boxes) == 0:
        return frames.clone()
    if frames.device.type != "cpu":
        return _draw_masked(frames, boxes, color, t)
    out = frames.clone()
    _, h, w, _ = frames.shape
    col = torch.tensor(list(color), dtype=frames.dtype)
    for i, bx in enumerate(boxes):
        for x1, y1, x2, y2 in bx[:, :4].detach().float().cpu().round().tolist():
            x1, x2 = min(x1, x2), max(x1, x2)
            y1, y2 = min(y1, y2), max(y1, y2)
            if not all(map(math.isfinite, (x1, y1, x2, y2))):
                continue
            if x2 < 0 or y2 < 0 or x1 > w - 1 or y1 > h - 1:
                continue
            xa, xb = max(int(x1), 0), min(int(x2), w - 1) + 1  # half-open column range
            ya, yb = max(int(y1), 0), min(int(y2), h - 1) + 1
            img = out[i]
            img[ya:min(ya + t, yb), xa:xb] = col
            img[max(yb - t, ya):yb, xa:xb] = col
            img[ya:yb, xa:min(xa + t, xb)] = col
            img[ya:yb, max(xb - t, xa):xb] = col
    return out


def _draw_masked(frames: Tensor, boxes: Sequence[Tensor], color: Sequence[int], t: int
                 ) -> Tensor:
    """``draw_boxes`` as batched tensor ops, whatever the number of boxes: a pixel is on some
    box's outline iff (boxes whose rectangle holds it) - (boxes whose inner rectangle holds it)
    > 0, and both counts are one batched product of per-box row and column masks."""
    b, h, w, _ = frames.shape
    dev = frames.device
    counts = [int(bx.shape[0]) for bx in boxes]
    kmax = max(counts)
    # Each box's slot in a [B, kmax] table (shapes only: no device sync).
    slots = torch.tensor([i * kmax + j for i, c in enumerate(counts) for j in range(c)],
                         device=dev)
    coords = torch.cat([bx[:, :4].detach().float().to(dev) for bx in boxes if bx.shape[0]])
    coords = coords.round()
    x1, x2 = torch.minimum(coords[:, 0], coords[:, 2]), torch.maximum(coords[:, 0], coords[:, 2])
    y1, y2 = torch.minimum(coords[:, 1], coords[:, 3]), torch.maximum(coords[:, 1], coords[:, 3])
    shown = (coords.isfinite().all(dim=1) & (x2 >= 0) & (y2 >= 0) & (x1 <= w - 1)
             & (y1 <= h - 1))
    big = float(max(h, w) + 2 * t)  # stands in for a non-finite corner of a skipped box
    xa, ya = x1.nan_to_num(0.0).clamp(0, big), y1.nan_to_num(0.0).clamp(0, big)
    xb = x2.nan_to_num(0.0).clamp(-1, w - 1) + 1  # half-open ends
    yb = y2.nan_to_num(0.0).clamp(-1, h - 1) + 1

    def bands(lo: Tensor, hi: Tensor, n: int) -> tuple[Tensor, Tensor]:
        i = torch.arange(n, device=dev, dtype=torch.float32)
        outer = (i >= lo[:, None]) & (i < hi[:, None]) & shown[:, None]
        inner = (i >= lo[:, None] + t) & (i < hi[:, None] - t) & shown[:, None]
        table = torch.zeros(b * kmax, 2, n, device=dev)
        table[slots] = torch.stack([outer, inner], dim=1).float()
        return table.view(b, kmax, 2, n)[:, :, 0], table.view(b, kmax, 2, n)[:, :, 1]

    ro, ri = bands(ya, yb, h)  # [B, kmax, H]
    co, ci = bands(xa, xb, w)  # [B, kmax, W]
    on = torch.bmm(ro.transpose(1, 2), co) - torch.bmm(ri.transpose(1, 2), ci) > 0.5
    col = torch.tensor(list(color), dtype=frames.dtype, device=dev)
    return torch.where(on[..., None], col, frames)
