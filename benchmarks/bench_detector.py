"""Face-detector throughput: one batched call for B frames vs B per-frame calls.

    python -m benchmarks.bench_detector [--device cuda] [--batches 1,8,32,64] [--size 640x480]

Frames are the astronaut picture pasted on a 640x480 canvas at varying places (one real face
each). Reports ms per call, frames/s and the per-frame baseline (the same model called once
per frame, as a FastRTC per-frame handler would) in the same run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.detector import FaceDetector, draw_boxes


def frames(n: int, w: int, h: int) -> np.ndarray:
    face = np.asarray(Image.open("tests/fixtures/astronaut.png").convert("RGB").resize((w // 2, h // 2)))
    out = np.full((n, h, w, 3), 40, np.uint8)
    for i in range(n):
        x, y = (i * 37) % (w // 2), (i * 23) % (h // 2)
        out[i, y : y + h // 2, x : x + w // 2] = face
    return out


def timed(fn, sync, reps: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,4,16,32,64")
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/bench_detector_{device}.md")
    args = ap.parse_args()
    command = "python -m benchmarks.bench_detector " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    w, h = (int(v) for v in args.size.split("x"))
    dev = torch.device(args.device)
    det = FaceDetector(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        host = frames(b, w, h)
        x = torch.from_numpy(host).to(dev)

        def batched() -> None:
            boxes = det.detect(x)
            draw_boxes(x, boxes).cpu()

        def per_frame() -> None:
            for i in range(b):
                fi = x[i : i + 1]
                draw_boxes(fi, det.detect(fi)).cpu()

        reps = max(2, args.reps // max(1, b // 16))
        tb = timed(batched, sync, reps)
        tp = timed(per_frame, sync, max(1, reps // 2)) if b <= 64 else float("nan")
        faces = sum(len(t) for t in det.detect(x))
        rows.append({"batch": b, "batched_ms": tb * 1e3, "batched_fps": b / tb,
                     "perframe_ms": tp * 1e3, "perframe_fps": b / tp, "faces": faces})
    lines = [
        f"# Batched MTCNN face detection, {w}x{h}, on {name} (torch {torch.__version__})",
        "",
        f"Command: `{command}` (median of {args.reps} batched calls; fewer above batch 16)",
        "",
        "| batch | batched call ms | batched frames/s | per-frame calls ms | per-frame frames/s | speed-up | faces found |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['batched_ms']:.1f} | {r['batched_fps']:,.0f} | {r['perframe_ms']:.1f} | "
            f"{r['perframe_fps']:,.0f} | {r['batched_fps'] / r['perframe_fps']:.1f}x | {r['faces']}/{r['batch']} |"
        )
    text = "\n".join(lines)
    print(text)
    out = Path(args.out.format(device=dev.type))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "device": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
