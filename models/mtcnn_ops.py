"""MTCNN's tensor helpers, shared by the detector's dynamic pipeline (``models.detector``) and
its fixed-shape one (``models.detector_graph``): box overlap, MTCNN's box regressions and
squaring, facenet-pytorch's crop bounds, and the integral image every area resize reads."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _overlap(a: Tensor, b: Tensor, mode: str, offset: float) -> Tensor:
    """Pairwise overlap of ``a [..., M, 4]`` and ``b [..., K, 4]`` -> ``[..., M, K]``."""
    area_a = (a[..., 2] - a[..., 0] + offset) * (a[..., 3] - a[..., 1] + offset)
    area_b = (b[..., 2] - b[..., 0] + offset) * (b[..., 3] - b[..., 1] + offset)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt + offset).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    if mode == "union":
        denom = area_a[..., :, None] + area_b[..., None, :] - inter
    elif mode == "min":
        denom = torch.minimum(area_a[..., :, None], area_b[..., None, :])
    else:
        raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")
    return inter / denom


# ------------------------------------------------------------------------------ box helpers
# Boxes are ``[..., >=4]`` (x1, y1, x2, y2, ...): the same code serves a flat ``[N, 5]`` list and
# the fixed pipeline's ``[B, K, 5]`` tables.
def _rerec(b: Tensor) -> Tensor:
    """Square boxes around their centres (side = longer side)."""
    b = b.clone()
    h = b[..., 3] - b[..., 1]
    w = b[..., 2] - b[..., 0]
    side = torch.maximum(w, h)
    b[..., 0] = b[..., 0] + w * 0.5 - side * 0.5
    b[..., 1] = b[..., 1] + h * 0.5 - side * 0.5
    b[..., 2] = b[..., 0] + side
    b[..., 3] = b[..., 1] + side
    return b


def _bbreg(b: Tensor, reg: Tensor) -> Tensor:
    """Apply R/ONet box regression (inclusive-pixel widths, as in MTCNN)."""
    b = b.clone()
    w = b[..., 2] - b[..., 0] + 1
    h = b[..., 3] - b[..., 1] + 1
    b[..., :4] = b[..., :4] + reg * torch.stack([w, h, w, h], dim=-1)
    return b


def _pnet_boxes(bx: Tensor, reg: Tensor, score: Tensor) -> Tensor:
    """PNet's regression (exclusive widths) and squaring -> ``[..., 5]`` with the score."""
    rw = bx[..., 2] - bx[..., 0]
    rh = bx[..., 3] - bx[..., 1]
    bx = bx + reg * torch.stack([rw, rh, rw, rh], dim=-1)
    return _rerec(torch.cat([bx, score[..., None]], dim=-1))


def _crop_bounds(b: Tensor, w: int, h: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """facenet-pytorch ``pad``: truncated, clamped 0-based crop ``[y0, y1) x [x0, x1)``."""
    t = b[:, :4].trunc().long()
    x0 = t[:, 0].clamp(min=1) - 1
    y0 = t[:, 1].clamp(min=1) - 1
    x1 = t[:, 2].clamp(max=w)
    y1 = t[:, 3].clamp(max=h)
    return y0, y1, x0, x1


def _area_bins(start: Tensor, stop: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """adaptive_avg_pool bin edges of ``[start, stop)`` split into ``size`` -> two ``[N, size]``."""
    length = (stop - start)[:, None]
    i = torch.arange(size, device=start.device)
    lo = torch.div(i * length, size, rounding_mode="floor")
    hi = torch.div((i + 1) * length + size - 1, size, rounding_mode="floor")
    return start[:, None] + lo, start[:, None] + hi


class _Integral:
    """Summed-area table of a uint8 ``[B, H, W, 3]`` batch: every area resize (the pyramid
    levels and the R/ONet crops) is four lookups in it instead of a pass over the pixels."""

    def __init__(self, frames: Tensor) -> None:
        b, h, w, c = frames.shape
        dtype = torch.int32 if 255 * h * w < 2**31 else torch.int64
        # [B, H+1, W+1, 3] with a zero first row and column; the sums are written in place.
        self.table = t = frames.new_empty((b, h + 1, w + 1, c), dtype=dtype)
        t[:, 0].zero_()
        t[:, 1:, 0].zero_()
        inner = t[:, 1:, 1:]
        torch.cumsum(frames, 1, dtype=dtype, out=inner)
        torch.cumsum(inner, 2, out=inner)

    def pyramid(self, corners: Tensor, scale: Tensor, shapes: Sequence[tuple[int, int]]
                ) -> list[Tensor]:
        """Every frame area-resized to every pyramid level, times a constant.

        ``corners [4, N]`` are the flat table offsets (within one frame) of each output
        value's bin corners, all levels concatenated; ``scale [N]`` is ``c / bin area``.
        Equal to ``c * interpolate(frames, size, mode="area")`` per level (the bins of
        ``adaptive_avg_pool2d``) with exact integer sums, in one gather for the whole pyramid.
        -> ``[B, 3, h, w]`` per level (channels-last views).
        """
        b = self.table.shape[0]
        n = corners.shape[1]
        v = torch.gather(self.table.view(b, -1), 1, corners.view(1, -1).expand(b, -1))
        v = v.view(b, 4, n)
        sums = (v[:, 0] - v[:, 1] - v[:, 2] + v[:, 3]).to(torch.float32)
        flat = sums * scale
        out, o = [], 0
        for h, w in shapes:
            out.append(flat[:, o:o + h * w * 3].view(b, h, w, 3).permute(0, 3, 1, 2))
            o += h * w * 3
        return out

    def crops(self, frame_idx: Tensor, y0: Tensor, y1: Tensor, x0: Tensor, x1: Tensor,
              size: int) -> Tensor:
        """Area-resample the crops ``[y0,y1) x [x0,x1)`` of the given frames -> ``[N,3,s,s]``.

        Equal to ``interpolate(frame[:, y0:y1, x0:x1], (size, size), mode="area")`` per crop;
        one ``index_select`` for the four corners of every bin of every crop.
        """
        t = self.table
        _, hp, wp, c = t.shape
        n = frame_idx.shape[0]
        ys, ye = _area_bins(y0, y1, size)
        xs, xe = _area_bins(x0, x1, size)
        base = frame_idx[:, None] * hp
        rs, re = ((base + ys) * wp)[:, :, None], ((base + ye) * wp)[:, :, None]
        cs, ce = xs[:, None, :], xe[:, None, :]
        idx = torch.stack([re + ce, re + cs, rs + ce, rs + cs])  # [4, N, s, s]
        v = t.view(-1, c).index_select(0, idx.view(-1)).view(4, n, size, size, c)
        total = v[0] - v[1] - v[2] + v[3]
        area = ((ye - ys)[:, :, None] * (xe - xs)[:, None, :]).to(torch.float32)
        return (total.to(torch.float32) / area[..., None]).permute(0, 3, 1, 2)


def _normalise(x: Tensor) -> Tensor:
    return (x - 127.5) * 0.0078125
