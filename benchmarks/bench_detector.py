"""Face-detector throughput, before and after, in one run: frames/s and batch latency.

    python -m benchmarks.bench_detector [--device cuda] [--batches 1,4,16,32,64,128]

Frames are the astronaut picture pasted on a 640x480 canvas at varying places (one real face
each). For each batch size it times, on the same frames:

- ``before``: the detector as it was before issue 14 (``models/detector.py`` at commit
  ``460de69``, read with ``git show``, or from ``--baseline FILE``), in a process of its own
  so that it runs as it did: the ``after`` detector changes a process-wide setting on CPU
  (``models.device.keep_freed_memory``) that would otherwise speed ``before`` up too. The
  processes take turns; neither runs while the other is timed;
- ``after``: ``FaceDetector(device)`` with its defaults (what the server runs: the CUDA-graph
  pipeline on a GPU, the dynamic one on CPU); on a GPU also ``dynamic`` and ``fixed``
  (the same pipelines without graphs), to attribute the gain;
- ``after, min_face_size=60``: the default detector told to skip faces under 60 pixels (the
  speed knob; its rows are not part of the "same detections" verdict);
- ``per-frame``: the default detector called once per frame (a FastRTC per-frame handler).

A row's time is one batch: detect, draw the boxes, copy the frames to the host (what the
server's handler does), median of ``--reps``; ``detect ms`` is detect alone. Each variant's
detections are compared with ``before``'s (IoU >= 0.9, scores within 0.01). The verdict is on
issue 14's targets: on a GPU >= 4,000 frames/s at a batch <= 64 taking <= 16 ms, and batch 32
in <= 8 ms; on a CPU >= 2x ``before``'s best frames/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from models.detector import FaceDetector, draw_boxes

BASELINE_REV = "460de69"


def frames(n: int, w: int, h: int) -> np.ndarray:
    face = np.asarray(Image.open("tests/fixtures/astronaut.png").convert("RGB").resize((w // 2, h // 2)))
    out = np.full((n, h, w, 3), 40, np.uint8)
    for i in range(n):
        x, y = (i * 37) % (w // 2), (i * 23) % (h // 2)
        out[i, y : y + h // 2, x : x + w // 2] = face
    return out


def load_baseline_source() -> Path:
    """The pre-issue-14 ``models/detector.py``, from git, in a temporary file."""
    src = subprocess.run(["git", "show", f"{BASELINE_REV}:models/detector.py"], check=True,
                         capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "detector_before.py"
    tmp.write_text(src)
    return tmp


def load_baseline(path: str | None) -> Any:
    """The pre-issue-14 ``models.detector`` module (from a file, or from git)."""
    if path is None:
        path = str(load_baseline_source())
    spec = importlib.util.spec_from_file_location("detector_before", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _before_worker(conn: Any, baseline: str | None, device: str, w: int, h: int) -> None:
    """The ``before`` detector in its own process, answering the parent's calls in turn."""
    torch.set_num_threads(int(conn.recv()))
    mod = load_baseline(baseline)
    det = mod.FaceDetector(torch.device(device))
    cuda = device.startswith("cuda")
    x = None
    while True:
        msg = conn.recv()
        if msg is None:
            return
        op, b = msg
        if x is None or x.shape[0] != b:
            x = torch.from_numpy(frames(b, w, h)).to(device)
        if op == "batch":
            mod.draw_boxes(x, det.detect(x)).cpu()
            out: Any = None
        else:
            out = [r.cpu() for r in det.detect(x)]
        if cuda:
            torch.cuda.synchronize()
        conn.send(out)


class BeforeProcess:
    """Proxy for the ``before`` detector in a spawned process: ``detect(x)`` and ``batch(x)``
    run there on the same frames (built there from ``frames()``; only the batch size travels)."""

    def __init__(self, baseline: str | None, device: torch.device, w: int, h: int) -> None:
        if baseline is None:  # read git here: the child's working directory may differ
            baseline = str(load_baseline_source())
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_before_worker, daemon=True,
                                 args=(child, baseline, str(device), w, h))
        self._proc.start()
        self._conn.send(torch.get_num_threads())
        self.pipeline = "dynamic"

    def _call(self, op: str, x: torch.Tensor) -> Any:
        self._conn.send((op, int(x.shape[0])))
        return self._conn.recv()

    def detect(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._call("detect", x)

    def batch(self, x: torch.Tensor) -> None:
        self._call("batch", x)

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(timeout=30)


def timed(fn: Callable[[], Any], sync: Callable[[], None], reps: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(calls: dict[str, dict[str, Callable[[], Any]]], sync: Callable[[], None],
                reps: int) -> dict[str, dict[str, float]]:
    """Median seconds of each call, the calls taking turns in every repetition."""
    samples: dict[str, dict[str, list[float]]] = {
        v: {k: [] for k in fns} for v, fns in calls.items()}
    for fns in calls.values():  # warm-up (graph capture, caches)
        for fn in fns.values():
            fn()
    sync()
    for _ in range(reps):
        for v, fns in calls.items():
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                sync()
                samples[v][k].append(time.perf_counter() - t0)
    return {v: {k: statistics.median(ts) for k, ts in d.items()} for v, d in samples.items()}


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    lt = torch.maximum(a[:2], b[:2])
    rb = torch.minimum(a[2:4], b[2:4])
    inter = (rb - lt).clamp(min=0).prod()
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


def agreement(ref: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[bool, float, float]:
    """(same faces in every frame, lowest IoU, largest score difference) vs the reference."""
    same, low, diff = True, 1.0, 0.0
    for r, g in zip(ref, got):
        r, g = r.cpu(), g.cpu()
        if r.shape != g.shape:
            same = False
            continue
        for x, y in zip(r, g):
            low = min(low, iou(x, y))
            diff = max(diff, abs(float(x[4] - y[4])))
    return same and low >= 0.9 and diff <= 0.01, low, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,4,16,32,64,128")
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--baseline", default=None, help="the pre-issue-14 detector.py (default: git)")
    ap.add_argument("--no-per-frame", action="store_true", help="skip the per-frame rows")
    ap.add_argument("--min-face-size", type=int, default=60,
                    help="min_face_size of the extra 'after' row (the default is 40)")
    ap.add_argument("--out", default="benchmarks/results/bench_detector_{device}.md")
    args = ap.parse_args()
    command = "python -m benchmarks.bench_detector " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    w, h = (int(v) for v in args.size.split("x"))
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    before = BeforeProcess(args.baseline, dev, w, h)
    variants: dict[str, Any] = {"before": before, "after": FaceDetector(dev)}
    if cuda:
        variants["dynamic"] = FaceDetector(dev, pipeline="dynamic")
        variants["fixed"] = FaceDetector(dev, pipeline="fixed")
    # The documented speed knob: faces under min_face_size pixels are not looked for.
    coarse = f"after, min_face_size={args.min_face_size}"
    variants[coarse] = FaceDetector(dev, min_face_size=args.min_face_size)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        x = torch.from_numpy(frames(b, w, h)).to(dev)
        reps = max(3, args.reps // max(1, b // 32))
        ref = variants["before"].detect(x)
        calls: dict[str, dict[str, Callable[[], Any]]] = {}
        for vname, det in variants.items():
            calls[vname] = {
                "batch": (lambda: before.batch(x)) if det is before
                else (lambda det=det: draw_boxes(x, det.detect(x)).cpu()),
                "detect": lambda det=det: det.detect(x),
            }
        # The variants take turns within each repetition, so a slow spell of a shared
        # machine hits them alike.
        times = interleaved(calls, sync, reps)
        for vname, det in variants.items():
            ok, low, diff = agreement(ref, det.detect(x))
            faces = sum(len(r) for r in det.detect(x))
            t, td = times[vname]["batch"], times[vname]["detect"]
            rows.append({"batch": b, "variant": vname, "ms": t * 1e3, "fps": b / t,
                         "detect_ms": td * 1e3, "faces": faces, "agrees": ok, "min_iou": low,
                         "max_score_diff": diff,
                         "fallbacks": getattr(det, "fallbacks", 0)})
            print(rows[-1], flush=True)
        if not args.no_per_frame and b <= 64:
            det = variants["after"]

            def per_frame() -> None:
                for i in range(b):
                    fi = x[i : i + 1]
                    draw_boxes(fi, det.detect(fi)).cpu()

            t = timed(per_frame, sync, max(2, reps // 4))
            rows.append({"batch": b, "variant": "per-frame", "ms": t * 1e3, "fps": b / t,
                         "detect_ms": float("nan"), "faces": sum(len(r) for r in ref),
                         "agrees": True, "min_iou": 1.0, "max_score_diff": 0.0, "fallbacks": 0})
            print(rows[-1], flush=True)

    before.close()

    def best(variant: str, cond: Callable[[dict], bool] = lambda r: True) -> dict | None:
        pool = [r for r in rows if r["variant"] == variant and cond(r)]
        return max(pool, key=lambda r: r["fps"]) if pool else None

    b_best, a_best = best("before"), best("after")
    verdicts = []
    if cuda:
        hit = best("after", lambda r: r["batch"] <= 64 and r["ms"] <= 16.0)
        met = hit is not None and hit["fps"] >= 4000
        verdicts.append(("GPU >= 4,000 frames/s at a batch <= 64 taking <= 16 ms",
                         f"best such row: batch {hit['batch']}, {hit['fps']:,.0f} frames/s, "
                         f"{hit['ms']:.1f} ms" if hit else "no such row", met))
        b32 = [r for r in rows if r["variant"] == "after" and r["batch"] == 32]
        verdicts.append(("batch 32 in <= 8 ms", f"{b32[0]['ms']:.1f} ms" if b32 else "not run",
                         bool(b32) and b32[0]["ms"] <= 8.0))
    else:
        ratio = a_best["fps"] / b_best["fps"]
        verdicts.append(("CPU >= 2x before's best frames/s",
                         f"after {a_best['fps']:.1f} (batch {a_best['batch']}) vs before "
                         f"{b_best['fps']:.1f} (batch {b_best['batch']}): {ratio:.2f}x",
                         ratio >= 2.0))
    same = [r for r in rows if r["variant"] != coarse]
    verdicts.append(("same detections as before (IoU >= 0.9, scores within 0.01)",
                     f"lowest IoU {min(r['min_iou'] for r in same):.4f}, largest score "
                     f"difference {max(r['max_score_diff'] for r in same):.5f}",
                     all(r["agrees"] for r in same)))

    lines = [
        f"# Batched MTCNN face detection, {w}x{h}, on {name} (torch {torch.__version__})",
        "",
        f"Command: `{command}` (median of {args.reps} calls, the variants taking turns; fewer "
        "above batch 32). A batch is "
        "detect + draw + copy to host; `before` is the detector at commit "
        f"{BASELINE_REV} (in a process of its own, as it ran), `after` the default `FaceDetector` "
        f"({variants['after'].pipeline} pipeline here).",
        "",
        "| batch | variant | batch ms | frames/s | vs before | detect ms | faces | same as before | fallbacks |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    ref_fps = {r["batch"]: r["fps"] for r in rows if r["variant"] == "before"}
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['ms']:.1f} | {r['fps']:,.0f} | "
            f"{r['fps'] / ref_fps[r['batch']]:.2f}x | {r['detect_ms']:.1f} | {r['faces']}/{r['batch']} | "
            f"{'yes' if r['agrees'] else 'NO'} | {r['fallbacks']} |")
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    for what, measured, met in verdicts:
        lines.append(f"| {what} | {measured} | {'MET' if met else 'NOT MET'} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out.format(device=dev.type))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "device": name, "rows": rows,
         "verdicts": [{"target": a, "measured": b, "met": c} for a, b, c in verdicts]}, indent=1))


if __name__ == "__main__":
    main()
